"""The graph's shape, derived from the Definitions' asset graph: which assets run together, in which
order, and which are observed rather than materialized. `refresh`, the demo and the refresh sensor
read it from here (the audit walks the asset graph itself); no module lists assets by hand, so a new
asset needs no edit anywhere.

- A *run group* is a partitioning: unpartitioned, per layer, or per layer x shard.
- Stages: an asset's stage is the latest stage of its materializable parents, plus one where the
  parent is in another run group or is a single-run backfill (neuron_records: contiguous layers are
  one run, one forward pass). An asset without materializable parents joins the earliest stage of its
  children in its own run group (imported_explanations runs with the simulations that read it).
  Within a stage, the assets of one partition run in one run, and Dagster orders them.
- Readers: a stale asset is rerun with its descendants of the same stage (a stale explanation with
  the simulations and scores of its shard).
"""

from collections.abc import Iterable
from dataclasses import dataclass

from dagster import BackfillPolicy, Definitions, MultiPartitionsDefinition

UNPARTITIONED, LAYER, LAYER_SHARD = "unpartitioned", "layer", "layer_shard"

Run = tuple[tuple[str, ...], str | tuple[str, str] | None]  # (assets, partition, layer range or None)


def run_group(partitions_def) -> str:
    """The partitioning of an asset: what its runs are keyed by."""
    if partitions_def is None:
        return UNPARTITIONED
    return LAYER_SHARD if isinstance(partitions_def, MultiPartitionsDefinition) else LAYER


def parent_partitions(graph, child, partition: str | None, parent) -> list[str | None]:
    """The partitions of `parent` that `child[partition]` reads (AssetKeys of an AssetGraph), by the
    dependency's partition mapping (layer x shard -> layer through the layer dimension)."""
    if graph.get(parent).partitions_def is None:
        return [None]
    mapped = graph.get_parent_partition_keys_for_child(partition, parent, child)
    return sorted(str(key) for key in mapped.partitions_subset.get_partition_keys())


def asset_graph(defs):
    """The asset graph of a Definitions object or of a RepositoryDefinition (a sensor's context)."""
    return defs.resolve_asset_graph() if isinstance(defs, Definitions) else defs.asset_graph


@dataclass(frozen=True)
class Shape:
    order: tuple[str, ...]  # materializable assets in topological order (ties: by name)
    stage: dict[str, int]
    group: dict[str, str]  # asset -> run group
    children: dict[str, tuple[str, ...]]  # materializable children
    sources: tuple[str, ...]  # observable source assets: the weights and the settings sources
    range_assets: frozenset[str]  # single-run backfills: a range of layers is one run

    @property
    def stages(self) -> list[tuple[str, ...]]:
        """The materializable assets per stage, in topological order."""
        return [tuple(a for a in self.order if self.stage[a] == s) for s in sorted(set(self.stage.values()))]

    def stage_of(self, asset: str) -> int:
        return self.stage.get(asset, max(self.stage.values(), default=0) + 1)

    def position(self, asset: str) -> int:
        return self.order.index(asset) if asset in self.order else len(self.order)

    def readers(self, assets: Iterable[str]) -> set[str]:
        """`assets` and their descendants within their own stage."""
        found, todo = set(assets), list(assets)
        while todo:
            asset = todo.pop()
            for child in self.children.get(asset, ()):
                if child not in found and self.stage_of(child) == self.stage_of(asset):
                    found.add(child)
                    todo.append(child)
        return found

    def sort_key(self, asset: str, partition: str | None):
        return self.stage_of(asset), partition or "", self.position(asset)

    def demo_runs(self, layers: tuple[str, ...], shards: list[str]) -> list[Run]:
        """Every asset of the graph for `layers` x `shards`: first observe every source (so later
        changes of weights or settings are seen), then stage by stage, one run per partition (a range
        run over `layers` for single-run backfills)."""
        runs: list[Run] = [(self.sources, None)] if self.sources else []
        for names in self.stages:
            for group in dict.fromkeys(self.group[a] for a in names):
                selection = tuple(a for a in names if self.group[a] == group)
                if group == UNPARTITIONED:
                    runs.append((selection, None))
                elif set(selection) & self.range_assets:
                    runs.append((selection, (layers[0], layers[-1])))
                elif group == LAYER:
                    runs += [(selection, layer) for layer in layers]
                else:
                    runs += [(selection, f"{layer}|{shard}") for layer in layers for shard in shards]
        return runs


def shape_of(defs) -> Shape:
    """The shape of a Definitions object's (or a RepositoryDefinition's) asset graph."""
    graph = asset_graph(defs)
    keys = {k.to_user_string(): k for k in graph.materializable_asset_keys}
    group = {name: run_group(graph.get(key).partitions_def) for name, key in keys.items()}
    ranges = frozenset(name for name, key in keys.items() if graph.get(key).backfill_policy == BackfillPolicy.single_run())
    parents = {name: sorted(p.to_user_string() for p in graph.get(key).parent_keys if p.to_user_string() in keys)
               for name, key in keys.items()}
    children = {name: tuple(sorted(c.to_user_string() for c in graph.get(key).child_keys
                                    if c.to_user_string() in keys)) for name, key in keys.items()}
    order = _toposort(parents)

    def together(parent: str, child: str) -> bool:
        return group[parent] == group[child] and not {parent, child} & ranges

    stage: dict[str, int] = {}
    for name in order:
        stage[name] = max((stage[p] + (0 if together(p, name) else 1) for p in parents[name]), default=0)
    for name in order:
        if not parents[name]:
            joined = [stage[c] for c in children[name] if together(name, c)]
            stage[name] = min(joined, default=stage[name])
    sources = tuple(sorted(k.to_user_string() for k in graph.observable_asset_keys))
    return Shape(tuple(order), stage, group, children, sources, ranges)


def _toposort(parents: dict[str, list[str]]) -> list[str]:
    done: list[str] = []
    left = dict(parents)
    while left:
        ready = sorted(name for name, ps in left.items() if all(p in done for p in ps))
        done.append(ready[0])
        del left[ready[0]]
    return done
