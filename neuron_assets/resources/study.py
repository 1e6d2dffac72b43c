"""What a study samples and explains: window length, record counts, neuron selection, seed."""

from pathlib import Path

import polars as pl
from dagster import ConfigurableResource

from neuron_assets.method.selection import RANKINGS, dead_and_rare, top_neurons
from neuron_assets.settings import NeuronSelection

PROMPTS = Path(__file__).resolve().parents[2] / "resources" / "prompts"


class Study(ConfigurableResource):
    seq_len: int = 64
    max_windows: int = 0
    top_records: int = 40
    random_records: int = 20
    neurons: str = "all"
    min_activation_frequency: float = 1e-5
    output_variants: bool = False  # also explain each unit from the tokens its output promotes
    seed: int = 0
    prompts: str = str(PROMPTS)

    @property
    def ranks_by_stats(self) -> bool:
        """Whether `selected` needs neuron_records' stats ('top:N:<statistic>')."""
        return NeuronSelection.parse(self.neurons).mode == "top"

    def selected(self, shard_neurons: range, stats: pl.DataFrame | None) -> list[int]:
        """The neurons of a shard that are explained and scored, ascending (`neurons` was checked
        with the other settings, before any run). `stats`, neuron_records' stats table of the layer
        (or of the shard), ranks them for 'top:N:<statistic>'; the other selections ignore it."""
        selection = NeuronSelection.parse(self.neurons)
        if selection.mode != "top":
            return selection.of_shard(shard_neurons)
        if stats is None:
            raise ValueError(f"NEURON_ASSETS_NEURONS={selection} ranks the neurons by their stats: "
                             "materialize neuron_records for the layer first")
        column, highest_first = RANKINGS[selection.ranking]
        if column not in stats.columns:  # a table written before the column existed
            raise ValueError(f"NEURON_ASSETS_NEURONS={selection} ranks by {column}, which these neuron_records stats "
                             "lack: materialize neuron_records for the layer again")
        shard = stats.filter(pl.col("unit").is_between(shard_neurons.start, shard_neurons.stop - 1))
        return sorted(top_neurons(shard["unit"].to_list(), shard[column].to_list(),
                                  shard["max_activation"].to_list(), selection.numbers[0], highest_first))

    def dead_and_rare(self, stats: pl.DataFrame) -> tuple[list[int], list[int]]:
        """The (dead, rare) units of neuron_records' `stats` table (method/selection.py)."""
        if "activation_frequency" not in stats.columns:  # a table written before the column existed
            raise ValueError("these neuron_records stats lack activation_frequency: materialize neuron_records "
                             "for the layer again")
        return dead_and_rare(stats["unit"].to_list(), stats["activation_frequency"].to_list(),
                             self.min_activation_frequency)
