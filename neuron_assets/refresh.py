"""Refresh only what is stale: find stale or missing partitions and rerun them, stage by stage.

Dagster computes staleness per partition, from data versions and code versions, but not
transitively: after neuron_records[05] is rerun with a new data version, explanations[05|*]
become stale only then. So `refresh` loops: observe the sources (the weights and the settings),
find what is stale, run the earliest stage's runs, and look again, until nothing is stale. The
stages and what a run selects come from the asset graph (neuron_assets/graph.py).

`neuron-assets refresh [--dry-run] [--submit URL]` calls `refresh` (neuron_assets/cli.py).
"""

import time
from collections import Counter
from collections.abc import Callable

from dagster import AssetKey, AssetRecordsFilter

from neuron_assets.graph import Run, Shape, asset_graph, parent_partitions, shape_of
from neuron_assets.runs import materialize_runs

Stale = tuple[str, str | None, str]  # (asset, partition or None, reason)


def _resolver(instance, asset_graph):
    # internal: the per-partition stale status the UI shows has no public API (1.13)
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
    # internal: the stale status values and "never materialized" marker of that resolver
    from dagster._core.definitions.data_version import NULL_DATA_VERSION, DataProvenance, StaleStatus

    graph = asset_graph(defs)
    resolver = _resolver(instance, graph)

    def exists(key: AssetKey, partition: str | None) -> bool:
        return resolver.get_current_data_version(key, partition) != NULL_DATA_VERSION

    def inputs_exist(key: AssetKey, partition: str | None) -> bool:
        for parent in graph.get(key).parent_keys:
            if graph.get(parent).is_external:
                continue  # a source (the weights) is assumed present, as Dagster does
            if not any(exists(parent, p) for p in parent_partitions(graph, key, partition, parent)):
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

    found: dict[tuple[str, str | None], str] = {}
    for key in graph.materializable_asset_keys:
        node = graph.get(key)
        partitions = list(node.partitions_def.get_partition_keys()) if node.is_partitioned else [None]
        for partition in partitions:
            where = (key.to_user_string(), partition and str(partition))
            status = resolver.get_status(key, partition)
            if status == StaleStatus.STALE:
                found[where] = "; ".join(dict.fromkeys(_describe(c) for c in resolver.get_stale_causes(key, partition)))
            elif status == StaleStatus.MISSING and include_missing and inputs_exist(key, partition):
                found[where] = "missing; its inputs exist"
            elif status == StaleStatus.FRESH and (reason := unobserved_source(key, partition)):
                found[where] = reason
    # A stale partition whose parent is missing (an asset a setting just added, such as
    # revised_explanations) cannot run without it: propose the parent too.
    for (name, partition), reason in list(found.items()):
        key = AssetKey.from_user_string(name)
        for parent in graph.get(key).parent_keys:
            if not graph.get(parent).is_materializable:
                continue
            for p in parent_partitions(graph, key, partition, parent):
                needed = (parent.to_user_string(), p)
                if needed not in found and not exists(parent, p) and inputs_exist(parent, p):
                    found[needed] = f"missing; {name}" + (f"[{partition}]" if partition else "") + " reads it"
    shape = shape_of(defs)
    return sorted(((a, p, r) for (a, p), r in found.items()), key=lambda s: shape.sort_key(s[0], s[1]))


def downstream(defs, instance, stale: list[Stale]) -> list[tuple[str, str | None]]:
    """The materialized partitions downstream of `stale`, in stage order: what may become stale once
    `stale` is recomputed (if its data versions change): a dry run's upper bound."""
    # internal: the resolver's marker and the (asset, partition) key of the asset graph's child walk
    from dagster._core.definitions.data_version import NULL_DATA_VERSION
    from dagster._core.definitions.events import AssetKeyPartitionKey

    graph = asset_graph(defs)
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
    shape = shape_of(defs)
    return sorted(found, key=lambda f: shape.sort_key(*f))


def first_stage(shape: Shape, stale: list[Stale]) -> list[Stale]:
    """The entries of the earliest stage present: what can run now without waiting for upstream."""
    if not stale:
        return []
    earliest = min(shape.stage_of(asset) for asset, _, _ in stale)
    return [s for s in stale if shape.stage_of(s[0]) == earliest]


def _ranges(keys: list[str], order: list[str]) -> list[str | tuple[str, str]]:
    """Contiguous runs of partition keys (neighbours in `order`)."""
    position = {k: i for i, k in enumerate(order)}
    out, run = [], []
    for key in sorted(keys, key=position.__getitem__):
        if run and position[key] != position[run[-1]] + 1:
            out.append(run)
            run = []
        run.append(key)
    if run:
        out.append(run)
    return [r[0] if len(r) == 1 else (r[0], r[-1]) for r in out]


def refresh_runs(defs, stale: list[Stale]) -> list[Run]:
    """The runs that recompute `stale`, in stage order, in the format of `runs.materialize_runs`:
    per stage and partition, one run of the stale assets and those of the stage that read them
    (a stale explanation with the simulations and scores of its shard); contiguous layers of a
    single-run backfill (neuron_records) as one range run: one forward pass."""
    shape, graph = shape_of(defs), asset_graph(defs)
    by_partition: dict[tuple[int, str | None], set[str]] = {}
    for asset, partition, _ in stale:
        by_partition.setdefault((shape.stage_of(asset), partition), set()).add(asset)
    runs: list[tuple[tuple, Run]] = []
    for stage in sorted({s for s, _ in by_partition}):
        partitions = sorted((p for s, p in by_partition if s == stage), key=lambda p: p or "")
        ranged = {a for p in partitions for a in by_partition[(stage, p)]} & shape.range_assets
        if ranged:
            names = tuple(a for a in shape.order if a in shape.readers(ranged))
            order = [str(k) for k in graph.get(AssetKey.from_user_string(min(ranged))).partitions_def
                     .get_partition_keys()]
            for part in _ranges([p for p in partitions if p is not None], order):
                runs.append(((stage, "", part if isinstance(part, str) else part[0]), (names, part)))
            continue
        for p in partitions:
            rerun = shape.readers(by_partition[(stage, p)])
            runs.append(((stage, "", p or ""), (tuple(a for a in shape.order if a in rerun), p)))
    return [run for _, run in sorted(runs, key=lambda r: r[0])]


def observe_sources(defs, instance, log: Callable[[str], None] = print) -> None:
    """Observe every source: the hash of each layer's weights (read from the checkpoint on disk)
    and of each settings source (the settings in force in this process)."""
    sources = shape_of(defs).sources
    if sources:
        materialize_runs(defs, instance, [(sources, None)], log=log)


def refresh(defs, instance, dry_run: bool = False, log: Callable[[str], None] = print, observe: bool = True,
            include_missing: bool = True, max_rounds: int = 10, launch=materialize_runs) -> list[Run]:
    """Observe the sources, then run the earliest stage's stale partitions and look again, until
    nothing is stale (at most `max_rounds` rounds). Returns every run launched; with `dry_run`,
    the first round's runs, launching nothing (later stages become stale only once it has run).
    `include_missing=False` leaves missing partitions alone where nothing stale reads them.
    `launch(defs, instance, runs, log=...)` executes a stage's runs (default: in this process)."""
    if observe:
        observe_sources(defs, instance, log=lambda _: None)
    shape = shape_of(defs)
    launched: list[Run] = []
    started = time.monotonic()
    for round_ in range(1, max_rounds + 1):
        stale = stale_partitions(defs, instance, include_missing)
        if not stale:
            log(f"nothing is stale ({round_ - 1} round(s), {len(launched)} run(s), "
                f"{time.monotonic() - started:.0f} s)")
            return launched
        stage = first_stage(shape, stale)
        runs = refresh_runs(defs, stage)
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
        launch(defs, instance, runs, log=log)
        launched += runs
    left = stale_partitions(defs, instance, include_missing)
    raise RuntimeError(f"still stale after {max_rounds} rounds: {left[:5]}")
