"""Layer and layer x shard partitions, built from the subject model's shape and the settings.

Keys are zero-padded so that lexical order is numeric order ("00".."29").
"""

from dataclasses import dataclass

from dagster import MultiPartitionsDefinition, StaticPartitionsDefinition

from neuron_assets.settings import parse_layers


@dataclass(frozen=True)
class Layout:
    layers: list[int]
    n_layers: int
    n_neurons: int
    shards: int

    @property
    def shard_size(self) -> int:
        return -(-self.n_neurons // self.shards)

    def layer_key(self, layer: int) -> str:
        return str(layer).zfill(max(2, len(str(self.n_layers - 1))))

    def shard_key(self, shard: int) -> str:
        return str(shard).zfill(2)

    def shard_neurons(self, shard_key: str) -> range:
        start = int(shard_key) * self.shard_size
        return range(start, min(self.n_neurons, start + self.shard_size))


def build_layout(layers_spec: str, n_layers: int, n_neurons: int, shards: int) -> Layout:
    if shards > n_neurons:
        raise ValueError(f"NEURON_ASSETS_SHARDS={shards} exceeds the {n_neurons} neurons per layer")
    return Layout(parse_layers(layers_spec, n_layers), n_layers, n_neurons, shards)


def layer_partitions(layout: Layout) -> StaticPartitionsDefinition:
    return StaticPartitionsDefinition([layout.layer_key(i) for i in layout.layers])


def layer_shard_partitions(layout: Layout) -> MultiPartitionsDefinition:
    return MultiPartitionsDefinition(
        {
            "layer": layer_partitions(layout),
            "shard": StaticPartitionsDefinition([layout.shard_key(s) for s in range(layout.shards)]),
        }
    )
