"""Refresh only what is stale: find stale or missing partitions and rerun them, stage by stage.

Dagster computes staleness per partition, from data versions and code versions, but not
transitively: after neuron_records[05] is rerun with a new data version, explanations[05|*]
become stale only then. So `refresh` loops: observe the weights, find what is stale, run the
earliest stage's runs, and look again, until nothing is stale.

`neuron-assets refresh [--dry-run]` is `main_refresh`.
"""

import time
from collections import Counter
from collections.abc import Callable

from dagster import AssetKey, AssetRecordsFilter, Definitions

# Stages in graph order; a run never spans two stages. Within a stage, a run selects the stale
# assets of the stage and those of the stage that read them (a stale simulation is rerun with its
# scores, a stale explanation with everything of its shard). Assets the settings leave out of the
# graph are dropped from the runs by `cli.materialize_runs`.
STAGES: tuple[tuple[str, ...], ...] = (
    ("corpus_documents", "corpus_tokens"),
    ("neuron_records",),
    ("explanations", "revised_explanations", "imported_explanations", "simulations", "scores", "detection_scores"),
    ("layer_summary", "exported_neurons", "neuron_viewer"),
    ("model_summary",),
    ("neuron_viewer_index",),
)
READERS = {"corpus_documents": ("corpus_tokens",),
           "explanations": ("revised_explanations", "simulations", "scores", "detection_scores"),
           "revised_explanations": ("simulations", "scores", "detection_scores"),
           "imported_explanations": ("simulations", "scores", "detection_scores"),
           "simulations": ("scores",)}
RANGE_ASSETS = {"neuron_records"}  # single-run backfill: contiguous layers are one run, one forward pass
WEIGHTS = "subject_model_weights"

Stale = tuple[str, str | None, str]  # (asset, partition or None, reason)
Run = tuple[tuple[str, ...], str | tuple[str, str] | None]  # the run format of cli.materialize_runs


def _stage(asset: str) -> int:
    return next((i for i, names in enumerate(STAGES) if asset in names), len(STAGES))


def _position(asset: str) -> int:
    stage = _stage(asset)
    return STAGES[stage].index(asset) if stage < len(STAGES) else 0


def _asset_graph(defs):
    """The asset graph of a Definitions object or of a RepositoryDefinition (a sensor's context)."""
    return defs.resolve_asset_graph() if isinstance(defs, Definitions) else defs.asset_graph


def _resolver(instance, asset_graph):
    from dagster._core.asset_graph_view.asset_graph_view import AssetGraphView
    from dagster._core.definitions.data_version import CachingStaleStatusResolver
    from dagster._core.definitions.temporal_context import TemporalContext
    from dagster._time import get_current_datetime

    view = AssetGraphView(temporal_context=TemporalContext(effective_dt=get_current_datetime(), last_event_id=None),
                          instance=instance, asset_graph=asset_graph)
    return CachingStaleStatusResolver(instance, asset_graph, loading_context=view)


def _describe(cause) -> str:
    dep = cause.dependency
    where = ""
    if dep is not None:
        where = f" ({dep.asset_key.to_user_string()}" + (f"[{dep.partition_key}]" if dep.partition_key else "") + ")"
    return cause.reason + where


def stale_partitions(defs, instance, include_missing: bool = True) -> list[Stale]:
    """Every partition of every materializable asset that Dagster reports STALE, plus (unless
    `include_missing` is False) MISSING ones whose inputs exist (at least one mapped partition of
    every parent), in stage and partition order.

    A partition whose inputs were never materialized is not proposed: explanations for a layer
    without neuron_records, or shards of layers that were never run. Only one step of staleness
    is visible at a time (Dagster's staleness is not transitive); see `refresh`.
    """
    from dagster._core.definitions.data_version import NULL_DATA_VERSION, DataProvenance, StaleStatus

    graph = _asset_graph(defs)
    resolver = _resolver(instance, graph)

    def exists(key: AssetKey, partition: str | None) -> bool:
        return resolver.get_current_data_version(key, partition) != NULL_DATA_VERSION

    def inputs_exist(key: AssetKey, partition: str | None) -> bool:
        for parent in graph.get(key).parent_keys:
            if graph.get(parent).is_external:
                continue  # a source (the weights) is assumed present, as Dagster does
            if not graph.get(parent).is_partitioned:
                if not exists(parent, None):
                    return False
                continue
            mapped = graph.get_parent_partition_keys_for_child(partition, parent, key).partitions_subset
            if not any(exists(parent, p) for p in mapped.get_partition_keys()):
                return False
        return True

    observed = {k for k in graph.external_asset_keys
                if instance.fetch_observations(k, limit=1).records}

    def unobserved_source(key: AssetKey, partition: str | None) -> str | None:
        """A materialization made before a source was ever observed records no pointer to an
        observation, and Dagster then never reports a change of that source: treat it as stale."""
        sources = [p for p in graph.get(key).parent_keys if p in observed]
        if not sources:
            return None
        records = instance.fetch_materializations(
            AssetRecordsFilter(asset_key=key, asset_partitions=[partition] if partition else None), limit=1).records
        provenance = DataProvenance.from_tags(records[0].asset_materialization.tags or {}) if records else None
        missing = [p for p in sources if provenance and provenance.input_storage_ids.get(p, 0) is None]
        return f"materialized before {missing[0].to_user_string()} was first observed" if missing else None

    found: list[Stale] = []
    for key in graph.materializable_asset_keys:
        node = graph.get(key)
        partitions = list(node.partitions_def.get_partition_keys()) if node.is_partitioned else [None]
        for partition in partitions:
            status = resolver.get_status(key, partition)
            if status == StaleStatus.STALE:
                reason = "; ".join(dict.fromkeys(_describe(c) for c in resolver.get_stale_causes(key, partition)))
                found.append((key.to_user_string(), partition and str(partition), reason))
            elif status == StaleStatus.MISSING and include_missing and inputs_exist(key, partition):
                found.append((key.to_user_string(), partition and str(partition), "missing; its inputs exist"))
            elif status == StaleStatus.FRESH and (reason := unobserved_source(key, partition)):
                found.append((key.to_user_string(), partition and str(partition), reason))
    return sorted(found, key=lambda s: (_stage(s[0]), s[1] or "", _position(s[0])))


def downstream(defs, instance, stale: list[Stale]) -> list[tuple[str, str | None]]:
    """The materialized partitions downstream of `stale`, in stage order: what may become stale once
    `stale` is recomputed (if its data versions change): a dry run's upper bound."""
    from dagster._core.definitions.data_version import NULL_DATA_VERSION
    from dagster._core.definitions.events import AssetKeyPartitionKey

    graph = _asset_graph(defs)
    resolver = _resolver(instance, graph)
    todo = [AssetKeyPartitionKey(AssetKey.from_user_string(a), p) for a, p, _ in stale]
    seen, found = set(todo), []
    while todo:
        node = todo.pop()
        for child in graph.get_children_partitions(node.asset_key, node.partition_key):
            if child in seen:
                continue
            seen.add(child)
            if resolver.get_current_data_version(child.asset_key, child.partition_key) != NULL_DATA_VERSION:
                todo.append(child)
                found.append((child.asset_key.to_user_string(), child.partition_key and str(child.partition_key)))
    return sorted(found, key=lambda f: (_stage(f[0]), f[1] or "", _position(f[0])))


def first_stage(stale: list[Stale]) -> list[Stale]:
    """The entries of the earliest stage present: what can run now without waiting for upstream."""
    if not stale:
        return []
    earliest = min(_stage(asset) for asset, _, _ in stale)
    return [s for s in stale if _stage(s[0]) == earliest]


def _ranges(keys: list[str], order: list[str] | None) -> list[str | tuple[str, str]]:
    """Contiguous runs of partition keys (neighbours in `order`, or consecutive integers)."""
    position = {k: i for i, k in enumerate(order)} if order else {k: int(k) for k in keys}
    out, run = [], []
    for key in sorted(keys, key=position.__getitem__):
        if run and position[key] != position[run[-1]] + 1:
            out.append(run)
            run = []
        run.append(key)
    if run:
        out.append(run)
    return [r[0] if len(r) == 1 else (r[0], r[-1]) for r in out]


def refresh_runs(stale: list[Stale], layer_order: list[str] | None = None) -> list[Run]:
    """The runs that recompute `stale`, in graph order, in the format of `cli.materialize_runs`:
    corpus first, then neuron_records (contiguous layers as one range run: one forward pass), then
    one run per layer|shard (the stale assets and those of the shard that read them), then
    layer_summary and exported_neurons per layer, then model_summary. `layer_order` is the layer partition keys in
    order (default: consecutive integers are contiguous)."""
    by_partition: dict[tuple[int, str | None], set[str]] = {}
    for asset, partition, _ in stale:
        by_partition.setdefault((_stage(asset), partition), set()).add(asset)
    runs: list[tuple[tuple, Run]] = []
    for stage in sorted({s for s, _ in by_partition}):
        names = STAGES[stage] if stage < len(STAGES) else None
        partitions = sorted((p for s, p in by_partition if s == stage), key=lambda p: p or "")
        if names is None:  # an asset outside the known stages: one run per asset and partition
            runs += [((stage, a, p or ""), ((a,), p)) for p in partitions for a in sorted(by_partition[(stage, p)])]
        elif set(names) & RANGE_ASSETS:
            for part in _ranges([p for p in partitions if p is not None], layer_order):
                first = part if isinstance(part, str) else part[0]
                runs.append(((stage, "", first), (names, part)))
        else:
            for p in partitions:
                stale_here = by_partition[(stage, p)]
                rerun = stale_here.union(*(READERS.get(a, ()) for a in stale_here))
                runs.append(((stage, "", p or ""), (tuple(a for a in names if a in rerun), p)))
    return [run for _, run in sorted(runs, key=lambda r: r[0])]


def observe_weights(defs, instance, log: Callable[[str], None] = print) -> None:
    """Record the current hash of every layer's weights (read from the checkpoint on disk)."""
    from neuron_assets.cli import materialize_runs

    materialize_runs(defs, instance, [((WEIGHTS,), None)], log=log)


def refresh(defs, instance, dry_run: bool = False, log: Callable[[str], None] = print, observe: bool = True,
            include_missing: bool = True, max_rounds: int = 10) -> list[Run]:
    """Observe the weights, then run the earliest stage's stale partitions and look again, until
    nothing is stale (at most `max_rounds` rounds). Returns every run launched; with `dry_run`,
    the first round's runs, launching nothing (later stages become stale only once it has run).
    `include_missing=False` leaves missing partitions alone even where their inputs exist."""
    from neuron_assets.cli import materialize_runs

    if observe:
        observe_weights(defs, instance, log=lambda _: None)
    layer_order = [str(k) for k in defs.resolve_assets_def("neuron_records").partitions_def.get_partition_keys()]
    launched: list[Run] = []
    started = time.monotonic()
    for round_ in range(1, max_rounds + 1):
        stale = stale_partitions(defs, instance, include_missing)
        if not stale:
            log(f"nothing is stale ({round_ - 1} round(s), {len(launched)} run(s), "
                f"{time.monotonic() - started:.0f} s)")
            return launched
        stage = first_stage(stale)
        runs = refresh_runs(stage, layer_order)
        for asset, partition, reason in stage:
            log(f"stale: {asset}" + (f"[{partition}]" if partition else "") + f": {reason}")
        if dry_run:
            later = len(stale) - len(stage)
            log(f"would run ({len(runs)}):")
            for selection, partition in runs:
                where = f"{partition[0]}...{partition[1]}" if isinstance(partition, tuple) else (partition or "")
                log(f"  {', '.join(selection)}" + (f" [{where}]" if where else ""))
            if later:
                log(f"{later} partition(s) of later stages are stale too; they run after these")
            below = Counter(asset for asset, _ in downstream(defs, instance, stage))
            if below:
                log("then, where their data versions change, downstream of them (materialized partitions): "
                    + ", ".join(f"{asset} {n}" for asset, n in below.items()))
            return runs
        log(f"round {round_}: {len(runs)} run(s)")
        materialize_runs(defs, instance, runs, log=log)
        launched += runs
    left = stale_partitions(defs, instance, include_missing)
    raise RuntimeError(f"still stale after {max_rounds} rounds: {left[:5]}")


def main_refresh(args) -> None:
    """`neuron-assets refresh [--dry-run] [--stale-only] [--no-observe]`, on the instance under DAGSTER_HOME.

    Reads args.dry_run, and if present args.stale_only (leave missing partitions alone) and
    args.no_observe (do not observe the weights first)."""
    from neuron_assets.instance import open_instance
    from neuron_assets.definitions import build_definitions
    from neuron_assets.progress import with_progress_bar
    from neuron_assets.settings import Settings

    # Progress lines as a progress bar on a terminal (runs in this process); plain lines otherwise.
    defs = with_progress_bar(build_definitions(Settings.from_env()))
    refresh(defs, open_instance(), dry_run=getattr(args, "dry_run", False),
            observe=not getattr(args, "no_observe", False), include_missing=not getattr(args, "stale_only", False))
