"""What reruns by itself: the automation condition of every asset, its sensor, the nightly
observation schedule and the (opt-in) stale-partition sensor.

- `ON_CHANGE` (on corpus_tokens and everything downstream): a partition that was materialized
  before reruns when the data version of one of its inputs changed, or when the asset's code
  version changed. Partitions that were never materialized are left alone (fill them explicitly).
- `neuron_assets_automation` (RUNNING by default): the sensor that evaluates those conditions.
- `observe_sources_nightly` (03:00, STOPPED by default): observes every source (subject_model_weights,
  a hash per layer, and the settings sources) and re-materializes corpus_documents (a content hash:
  unchanged text is a no-op). A changed layer, setting or corpus then reaches the automation sensor
  as a new data version.
- `refresh_stale_partitions` (STOPPED by default): requests, stage by stage, what
  `neuron_assets.refresh.stale_partitions` finds stale, as `neuron-assets refresh` does.
"""

import hashlib

from dagster import (
    AssetKey,
    AssetRecordsFilter,
    AssetSelection,
    AutomationCondition,
    AutomationConditionSensorDefinition,
    DefaultScheduleStatus,
    DefaultSensorStatus,
    RunRequest,
    SensorDefinition,
    SensorEvaluationContext,
    SkipReason,
    define_asset_job,
    schedule,
    sensor,
)

from neuron_assets.graph import run_group, shape_of
from neuron_assets.partitions import run_target
from neuron_assets.refresh import first_stage, refresh_runs, stale_partitions


def _dep_data_changed() -> AutomationCondition:
    """A dependency has a new data version (not merely a new materialization or observation with the
    same version), outside a run that also executed this asset, or will be requested this tick."""
    return AutomationCondition.any_deps_match(
        (AutomationCondition.data_version_changed() & ~AutomationCondition.executed_with_root_target())
        .with_label("data_version_changed_without_root")
        | AutomationCondition.will_be_requested()
    ).with_label("any_deps_data_version_changed")


def _code_changed() -> AutomationCondition:
    """The code version changed since the last tick, for partitions that exist and can run."""
    return (
        AutomationCondition.code_version_changed()
        & ~AutomationCondition.missing()
        & ~AutomationCondition.any_deps_missing()
        & ~AutomationCondition.in_progress()
    ).with_label("code_version_changed")


# eager(), with "a dependency updated" narrowed to "a dependency's data version changed": Dagster's
# own any_deps_updated() fires on every new materialization, so the nightly re-materialization of an
# unchanged corpus would rerun every layer; and only for partitions that exist: eager() would also
# fill every never-run shard of a layer whose records changed. code_version_changed() alone selects
# every partition, materialized or not, hence the guards in _code_changed().
def on_change(ignoring: AssetSelection | None = None, label: str = "on_change") -> AutomationCondition:
    """ON_CHANGE, not reacting to new data versions of the `ignoring` dependencies."""
    changed = _dep_data_changed() if ignoring is None else _dep_data_changed().ignore(ignoring)
    eager = AutomationCondition.eager().replace("any_deps_updated", changed) & ~AutomationCondition.missing()
    return (eager | _code_changed()).with_label(label)


ON_CHANGE = on_change()
# ON_CHANGE for what reads scores and also, for the whole lineage, neuron_records or corpus_tokens
# (the viewer's records, the layer summary's dead and rare units): a new version of those does not
# trigger a rerun by itself. It reaches these assets through the scores, which rerun after it;
# reacting to it directly would write new records beside old scores first, then again once the
# scores follow.
ON_SCORES_CHANGE = on_change(ignoring=AssetSelection.assets("neuron_records", "corpus_tokens"),
                             label="on_change_after_scores")


automation_sensor = AutomationConditionSensorDefinition(
    "neuron_assets_automation",
    target=AssetSelection.all(),
    default_status=DefaultSensorStatus.RUNNING,
    minimum_interval_seconds=60,
    description="Evaluates every asset's automation condition (ON_CHANGE in neuron_assets/automation.py): "
    "reruns materialized partitions whose inputs have a new data version or whose code version changed.",
)


def build_nightly_schedule(sources: tuple[str, ...]):
    """Nightly: observe every source (`sources`: the weights, one hash per layer, and the settings
    sources) and re-materialize corpus_documents (its data version is a content hash, so unchanged
    text changes nothing downstream). Changed layers, settings or text then reach the automation sensor."""

    @schedule(
        cron_schedule="0 3 * * *",
        name="observe_sources_nightly",
        target=AssetSelection.assets(*sources, "corpus_documents"),
        default_status=DefaultScheduleStatus.STOPPED,
        description="Nightly: observe every source (the weights, one hash per layer, and the settings sources) "
        "and re-materialize corpus_documents (a content hash: unchanged text changes nothing downstream). "
        "Changed layers, settings or text then reach the automation sensor.",
    )
    def observe_sources_nightly(context):
        stamp = context.scheduled_execution_time.strftime("%Y-%m-%d")
        # An observation without a partition hashes every layer; corpus_documents is unpartitioned.
        yield RunRequest(run_key=f"sources-{stamp}", asset_selection=[AssetKey(name) for name in sources])
        yield RunRequest(run_key=f"corpus-{stamp}", asset_selection=[AssetKey("corpus_documents")])

    return observe_sources_nightly


def _job_name(partitions_def) -> str:
    """The refresh job of an asset: a job's assets must share one partitions definition."""
    return f"{run_group(partitions_def)}_assets"


def build_refresh_sensor(assets) -> SensorDefinition:
    """The stale-partition sensor over the materializable `assets` (AssetsDefinitions), with one
    job per partitioning; built from the assets because the settings add or leave out some."""
    jobs: dict[str, list[AssetKey]] = {}
    for asset in assets:
        jobs.setdefault(_job_name(asset.partitions_def), []).extend(asset.keys)
    refresh_jobs = [define_asset_job(name, selection=AssetSelection.assets(*keys)) for name, keys in jobs.items()]

    @sensor(
        name="refresh_stale_partitions",
        jobs=refresh_jobs,
        default_status=DefaultSensorStatus.STOPPED,
        minimum_interval_seconds=300,
        description="Requests runs for stale partitions (neuron_assets.refresh; never-materialized ones are left "
        "alone), earliest stage first: staleness is not transitive in Dagster, so the next stage is requested "
        "on a later tick, once it has become stale. A request's run key names the latest materialization of "
        "each partition it recomputes, so a partition is requested once per change, not once per tick.",
    )
    def refresh_stale_partitions(context: SensorEvaluationContext):
        graph = context.repository_def.asset_graph
        # Stale partitions only, as `neuron-assets refresh` without --missing: never-run shards stay unrun.
        stale = stale_partitions(context.repository_def, context.instance, include_missing=False)
        runs = refresh_runs(context.repository_def, first_stage(shape_of(context.repository_def), stale))
        if not runs:
            return SkipReason("nothing is stale")
        requests = []
        for selection, partition in runs:
            key, tags = run_target(partition)
            job = _job_name(graph.get(AssetKey(selection[0])).partitions_def)
            requests.append(RunRequest(run_key=_run_key(context.instance, graph, selection, partition), job_name=job,
                                       asset_selection=[AssetKey(name) for name in selection], partition_key=key,
                                       tags=tags))
        return requests

    return refresh_stale_partitions


def _run_key(instance, graph, selection, partition) -> str:
    """The run and the latest materialization of every partition it recomputes: the same stale state
    gives the same key (Dagster skips it), a new materialization of one of them a new key."""
    parts = [",".join(selection), str(partition)]
    for name in selection:
        if isinstance(partition, tuple):
            keys = [str(k) for k in graph.get(AssetKey(name)).partitions_def.get_partition_keys()]
            keys = keys[keys.index(partition[0]) : keys.index(partition[1]) + 1]
        else:
            keys = [partition]
        for key in keys:
            records = instance.fetch_materializations(
                AssetRecordsFilter(asset_key=AssetKey(name), asset_partitions=[key] if key else None), limit=1
            ).records
            parts.append(str(records[0].storage_id) if records else "-")
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]
