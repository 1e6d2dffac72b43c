"""What a study samples and explains: window length, record counts, neuron selection, seed."""

from pathlib import Path

from dagster import ConfigurableResource

from neuron_assets.settings import NeuronSelection

PROMPTS = Path(__file__).resolve().parents[2] / "resources" / "prompts"


class Study(ConfigurableResource):
    seq_len: int = 64
    max_windows: int = 0
    top_records: int = 40
    random_records: int = 20
    neurons: str = "all"
    seed: int = 0
    prompts: str = str(PROMPTS)

    def selected(self, shard_neurons: range) -> list[int]:
        """The neurons of a shard that are explained and scored (`neurons` was checked with the
        other settings, before any run)."""
        return NeuronSelection.parse(self.neurons).of_shard(shard_neurons)
