"""Layer and layer x shard partitions, built from the units (the model's MLP neurons, or its coders'
latents) and the settings.

Keys are zero-padded so that lexical order is numeric order: layers "00".."29", shards named by
their unit range, "0000-0191".."1344-1535". (Shard keys that looked like layer keys would also
make Dagster's layer mapping ambiguous.)
"""

from dataclasses import dataclass, field

from dagster import MultiPartitionsDefinition, StaticPartitionsDefinition

from neuron_assets.settings import MLP_UNITS, SettingsError, parse_layers


@dataclass(frozen=True)
class Layout:
    layers: list[int]
    n_layers: int
    n_units: int  # per layer: MLP neurons, or a coder's latents
    shards: int
    hookpoints: dict[int, str] = field(default_factory=dict, compare=False)  # per layer, for coders' latents

    @property
    def shard_size(self) -> int:
        return -(-self.n_units // self.shards)

    def hookpoint(self, layer: int) -> str:
        """What the layer's units read: its coder's hookpoint, or 'mlp' for its MLP neurons."""
        return self.hookpoints.get(layer, MLP_UNITS)

    def layer_key(self, layer: int) -> str:
        return str(layer).zfill(max(2, len(str(self.n_layers - 1))))

    def shard_keys(self) -> list[str]:
        width = len(str(self.n_units - 1))
        starts = range(0, self.n_units, self.shard_size)
        return [f"{s:0{width}d}-{min(s + self.shard_size, self.n_units) - 1:0{width}d}" for s in starts]

    def shard_neurons(self, shard_key: str) -> range:
        first, last = shard_key.split("-")
        return range(int(first), int(last) + 1)


def build_layout(layers_spec: str, units, shards: int) -> Layout:
    """The layer x shard layout of the units (`SubjectModel.unit_shape()`): the layers NEURON_ASSETS_LAYERS
    names among those with units, and NEURON_ASSETS_SHARDS shards of each layer's units."""
    if shards > units.n_units:
        raise SettingsError(f"NEURON_ASSETS_SHARDS={shards} exceeds the {units.n_units} units per layer: "
                            f"write at most {units.n_units}")
    layers = parse_layers(layers_spec, units.n_layers)
    if units.hookpoints:
        without = [layer for layer in layers if layer not in units.hookpoints]
        if layers_spec.strip() != "all" and without:
            raise SettingsError(f"NEURON_ASSETS_LAYERS={layers_spec!r} names layer(s) {without} without a coder in "
                                f"NEURON_ASSETS_UNITS; its coders read layers {sorted(units.hookpoints)}: name some of "
                                "those, or write 'all'")
        layers = [layer for layer in layers if layer in units.hookpoints]
    return Layout(layers, units.n_layers, units.n_units, shards, dict(units.hookpoints))


def layer_partitions(layout: Layout) -> StaticPartitionsDefinition:
    return StaticPartitionsDefinition([layout.layer_key(i) for i in layout.layers])


def layer_shard_partitions(layout: Layout) -> MultiPartitionsDefinition:
    return MultiPartitionsDefinition(
        {
            "layer": layer_partitions(layout),
            "shard": StaticPartitionsDefinition(layout.shard_keys()),
        }
    )


def run_target(partition: str | tuple[str, str] | None) -> tuple[str | None, dict[str, str]]:
    """A run's partitions as Dagster takes them: one key, or a range of layers as range tags
    (one single-run backfill: one forward pass for all of them)."""
    if isinstance(partition, tuple):
        return None, {"dagster/asset_partition_range_start": partition[0],
                      "dagster/asset_partition_range_end": partition[1]}
    return partition, {}
