"""`launch_runs` on a real deployment: `dagster dev` (webserver, daemon, code server) on an on-disk
instance with Dagster's default QueuedRunCoordinator, serving a tiny model's graph (1 layer, 1 neuron
per shard) built from the same settings as this process's definitions. Runs are submitted over
GraphQL, queued, dequeued and launched by the daemon; their statuses and materializations are read
back from the instance. Stages in graph order: corpus, then neuron_records (a range run) together
with a run of a layer that does not exist (it fails), then one layer|shard run."""

from dataclasses import replace

import pytest
from dagster import (
    AssetKey,
    AssetRecordsFilter,
    DagsterEventType,
    DagsterInstance,
    DagsterRunStatus,
    QueuedRunCoordinator,
    RunsFilter,
)
from dagster_dev import dagster_dev, graphql, make_home, wait_for_code_location
from pipeline import tiny_settings
from services import free_port
from tiny_models import build_tiny_model

from neuron_assets.definitions import build_definitions
from neuron_assets import submit
from neuron_assets.submit import SUBMITTED_BY, launch_runs

LAYER, SHARD = "00", "00-31"
# One process per run instead of one per step (each step process imports torch and the graph again,
# ~6 s on 2 cores); the deployment's executor is otherwise left as it is.
IN_PROCESS = {"execution": {"config": {"in_process": {}}}}

SENSORS = """
query { workspaceOrError { ... on Workspace { locationEntries { locationOrLoadError { ... on RepositoryLocation {
  repositories { sensors { name sensorState { id status } } } } } } } } }
"""
STOP_SENSOR = """
mutation ($id: String!) { stopSensor(id: $id) { __typename
  ... on StopSensorMutationResult { instigationState { status } } ... on PythonError { message } } }
"""


def stop_automation_sensor(url: str) -> None:
    """The automation sensor (RUNNING by default) requests the shards whose neuron_records change:
    runs of its own that would race the submitted ones. Stopped, only the test's runs exist."""
    locations = graphql(url, SENSORS)["workspaceOrError"]["locationEntries"]
    states = [s["sensorState"] for loc in locations for repo in loc["locationOrLoadError"]["repositories"]
              for s in repo["sensors"] if s["name"] == "neuron_assets_automation"]
    assert states, "the automation sensor is not in the code location"
    for state in states:
        result = graphql(url, STOP_SENSOR, {"id": state["id"]})["stopSensor"]
        assert result["__typename"] == "StopSensorMutationResult", result
        assert result["instigationState"]["status"] == "STOPPED"


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("submit")
    model = build_tiny_model("gpt2", tmp / "model", n_layers=1)  # 64 neurons: shards 00-31 and 32-63
    settings = replace(tiny_settings(model, tmp), neurons="first:1", max_windows=40)
    home = make_home(tmp / "home")
    with DagsterInstance.from_config(str(home)) as instance:
        # no run_coordinator in resources/dagster.yaml: Dagster's default queues the runs for the daemon
        assert isinstance(instance.run_coordinator, QueuedRunCoordinator)
        with dagster_dev(home, settings.environment(), tmp / "logs") as url:
            wait_for_code_location(url)
            stop_automation_sensor(url)
            yield url, build_definitions(settings), instance, settings


def submitted(instance, **tags) -> list:
    return instance.get_runs(filters=RunsFilter(tags={SUBMITTED_BY: "refresh", **tags}))


def latest_run_id(instance, asset: str, partition: str | None = None) -> str | None:
    records = instance.fetch_materializations(
        AssetRecordsFilter(asset_key=AssetKey(asset), asset_partitions=[partition] if partition else None),
        limit=1).records
    return records[0].run_id if records else None


def assert_queued_and_succeeded(instance, run) -> None:
    """Created by the webserver for its code location, queued, then launched by the daemon, succeeded."""
    assert run.status == DagsterRunStatus.SUCCESS
    assert run.job_name == "__ASSET_JOB"
    assert run.tags["dagster/code_location"] == "neuron_assets.definitions"
    assert "neuron_assets/host" not in run.tags  # not a run executed by this process (runs.RUN_HOST)
    events = {e.dagster_event.event_type for e in instance.all_logs(run.run_id) if e.dagster_event}
    # RUN_ENQUEUED: the QueuedRunCoordinator queued it; RUN_STARTING: the daemon launched it (1.13 records no DEQUEUED)
    assert {DagsterEventType.RUN_ENQUEUED, DagsterEventType.RUN_STARTING, DagsterEventType.RUN_SUCCESS} <= events


def test_unreachable_webserver_is_one_clear_line(deployment):
    _, defs, instance, _ = deployment
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    with pytest.raises(ValueError, match=f"no Dagster webserver answers at {url}") as error:
        launch_runs(url, defs, instance, [(("corpus_documents",), None)], log=lambda _: None)
    assert "\n" not in str(error.value) and "dagster dev" in str(error.value)
    with pytest.raises(ValueError, match="must start with http"):
        launch_runs("127.0.0.1:3000", defs, instance, [(("corpus_documents",), None)])
    assert not submitted(instance)


def test_runs_go_through_the_queue(deployment):
    url, defs, instance, _ = deployment
    lines: list[str] = []
    # revised_explanations is not in these settings' graph: dropped from the selection, as materialize_runs does
    launch_runs(url, defs, instance, [(("corpus_documents", "corpus_tokens", "revised_explanations"), None)],
                log=lines.append, poll_s=0.5, timeout_s=120, run_config=IN_PROCESS)
    corpus, = submitted(instance)
    assert_queued_and_succeeded(instance, corpus)
    assert corpus.asset_selection == {AssetKey("corpus_documents"), AssetKey("corpus_tokens")}
    assert corpus.tags["neuron_assets/submitted_from"]
    assert latest_run_id(instance, "corpus_tokens") == corpus.run_id
    assert lines[0] == f"submitted 1 run(s) to {url}: {corpus.run_id}"
    assert lines[-1].startswith(f"run {corpus.run_id} SUCCESS (")

    # One stage, two independent runs: a range run of neuron_records, and one of a layer that does
    # not exist (the webserver queues it; it fails when it starts). The stage waits for both.
    lines.clear()
    with pytest.raises(SystemExit) as failure:
        launch_runs(url, defs, instance, [(("neuron_records",), (LAYER, LAYER)), (("neuron_records",), "99")],
                    log=lines.append, poll_s=0.5, timeout_s=120, run_config=IN_PROCESS)
    records, = submitted(instance, **{"dagster/asset_partition_range_start": LAYER})
    bad, = submitted(instance, **{"dagster/partition": "99"})
    assert_queued_and_succeeded(instance, records)
    assert records.tags["dagster/asset_partition_range_end"] == LAYER
    assert latest_run_id(instance, "neuron_records", LAYER) == records.run_id
    assert bad.status == DagsterRunStatus.FAILURE
    message = str(failure.value.code)
    assert f"1 of 2 run(s) submitted to {url} did not succeed" in message
    assert f"neuron_records [99]: FAILURE" in message and f"{url}/runs/{bad.run_id}" in message
    assert records.run_id not in message
    assert lines[0] == f"submitted 2 run(s) to {url}: {records.run_id}, {bad.run_id}"
    assert {line.split()[1] for line in lines[1:]} == {records.run_id, bad.run_id}

    # A layer x shard run: the multi-partition key as Dagster's tags (the key and one per dimension).
    key = f"{LAYER}|{SHARD}"
    launch_runs(url, defs, instance, [(("explanations", "simulations", "scores"), key)],
                log=lines.append, poll_s=0.5, timeout_s=120, run_config=IN_PROCESS)
    shard, = submitted(instance, **{"dagster/partition": key})
    assert_queued_and_succeeded(instance, shard)
    assert shard.tags["dagster/partition/layer"] == LAYER and shard.tags["dagster/partition/shard"] == SHARD
    for asset in ("explanations", "simulations", "scores"):
        assert latest_run_id(instance, asset, key) == shard.run_id
    assert latest_run_id(instance, "scores", f"{LAYER}|32-63") is None  # only the submitted shard ran
    assert len(submitted(instance)) == 4
    assert len(instance.get_runs()) == 4  # no run but the submitted ones (the automation sensor is stopped)


def test_refused_submission_names_the_url_and_the_reason(deployment):
    url, _, instance, settings = deployment
    # detection_scores is in the graph of other settings, not in the webserver's: Dagster's InvalidSubsetError
    other = build_definitions(replace(settings, detection="on"))
    before = len(instance.get_runs())
    with pytest.raises(ValueError, match=f"the Dagster webserver at {url} refused the run of detection_scores "
                                         r"\(InvalidSubsetError\).*detection_scores.*NEURON_ASSETS_"):
        launch_runs(url, other, instance, [(("detection_scores",), f"{LAYER}|{SHARD}")], log=lambda _: None)
    assert len(instance.get_runs()) == before
    # a query the schema rejects (HTTP 400 with GraphQL errors): the server's message, naming the URL
    with pytest.raises(ValueError, match=f"the Dagster webserver at {url} answered GraphQL errors: .*noSuchField"):
        submit.graphql(url, "query { noSuchField }")


def test_timeout_names_the_runs_still_going(deployment):
    url, defs, instance, _ = deployment
    with pytest.raises(SystemExit) as timeout:
        launch_runs(url, defs, instance, [(("layer_summary",), LAYER)], log=lambda _: None, poll_s=0.1,
                    timeout_s=0.2, run_config=IN_PROCESS)
    run, = submitted(instance, **{"dagster/partition": LAYER})
    message = str(timeout.value.code)
    assert message.startswith(f"timed out after 0 s waiting for 1 of 1 run(s) submitted to {url}")
    assert f"layer_summary [{LAYER}]: " in message and f"{url}/runs/{run.run_id}" in message
