"""Scale-out on real components: S3 (moto's server on loopback), a PostgreSQL Dagster instance,
parallel runs with the multiprocess executor and the llm pool, and a run killed with SIGKILL."""

import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import polars as pl
import pytest
import requests
import s3fs
from dagster import AssetKey, DagsterEventType, DagsterInstance, DagsterRunStatus
from openai_server import FakeOpenAIServer
from oracle_server import OracleServer
from pipeline import demo_runs, in_memory_instance, remote, run_graph, tiny_settings
from services import free_port, postgres_server
from tiny_models import build_tiny_model

from neuron_assets.runs import materialize_runs
from neuron_assets.definitions import build_definitions
from neuron_assets.instance import InstanceError, open_instance
from neuron_assets.resources.files import StorageError, check_s3_root
from neuron_assets.resources.llm import LLM_POOL
from neuron_assets.resources.storage import TableStorage
from neuron_assets.assets.common import CACHE_HITS

REPO = Path(__file__).resolve().parents[1]
KEY = "sk-test-scale-out-0193"
SHARD = "00-31"
TABLES = [("explanations", f"00|{SHARD}"), ("simulations", f"00|{SHARD}"), ("scores", f"00|{SHARD}"),
          ("layer_summary", "00"), ("model_summary", None)]


@pytest.fixture(scope="module")
def subject(tmp_path_factory):
    return build_tiny_model("gpt2", tmp_path_factory.mktemp("subject") / "gpt2", n_layers=2, max_positions=4096)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    return build_tiny_model("llama", tmp_path_factory.mktemp("served") / "llama", n_layers=1, max_positions=4096)


def tables(storage: TableStorage) -> dict:
    return {(asset, partition): storage.read(asset, partition) for asset, partition in TABLES}


def test_graph_on_s3_equals_the_local_graph(subject, served, tmp_path, s3, monkeypatch):
    monkeypatch.setenv("NEURON_ASSETS_EXPLAINER_API_KEY", KEY)
    monkeypatch.setenv("NEURON_ASSETS_SIMULATOR_API_KEY", KEY)
    corpus = tiny_settings(subject, tmp_path).corpus
    s3.put(corpus, "study/corpus/corpus.jsonl")
    with FakeOpenAIServer(served, api_key=KEY, digit_bias=6.0) as server:
        on_s3 = remote(tiny_settings(subject, tmp_path, layers="0", corpus="s3://study/corpus/corpus.jsonl",
                                     storage="s3://study/run-1"), server)
        (tmp_path / "local").mkdir()
        local = remote(tiny_settings(subject, tmp_path / "local", layers="0"), server)
        with in_memory_instance() as instance:
            ours = tables(run_graph(on_s3, instance, ("00",), [SHARD]))
            requests = len(server.requests)
            # Lose the tables, keep the response cache on S3: every answer comes from it.
            s3.rm("study/run-1/explanations", recursive=True)
            s3.rm("study/run-1/simulations", recursive=True)
            materialize_runs(build_definitions(on_s3), instance,
                             [(("explanations", "simulations", "scores"), f"00|{SHARD}")], log=lambda _: None)
            assert len(server.requests) == requests
            with in_memory_instance() as other:
                theirs = tables(run_graph(local, other, ("00",), [SHARD]))
    keys = s3.find("study/run-1")
    for asset in ("corpus_tokens", "neuron_records", "explanations", "simulations", "scores", "layer_summary"):
        assert any(f"/{asset}/" in key for key in keys), asset
    assert any("/llm_cache/" in key and key.endswith(".json") for key in keys)
    # the neuron viewer is written to the bucket too, the same pages as on the local disk
    for page in ("neuron_viewer/00/index.html", "neuron_viewer/index.html"):
        assert s3.cat(f"study/run-1/{page}") == (tmp_path / "local" / "data" / page).read_bytes(), page
    assert not any(KEY in s3.cat(key).decode(errors="replace") for key in keys if key.endswith(".json"))
    assert not (tmp_path / "data").exists()  # nothing went to the local disk
    for name, table in ours.items():
        assert table.equals(theirs[name]), name


def test_bad_s3_settings_name_the_setting_and_write_nothing(subject, tmp_path, s3, monkeypatch):
    missing = tiny_settings(subject, tmp_path, layers="0", storage="s3://no-such-bucket/run")
    with in_memory_instance() as instance, pytest.raises(SystemExit, match="bucket 'no-such-bucket' does not exist.*"
                                                                           "NEURON_ASSETS_STORAGE"):
        materialize_runs(build_definitions(missing), instance, [(("corpus_documents",), None)], log=lambda _: None)

    endpoint = os.environ["AWS_ENDPOINT_URL"]
    requests.post(f"{endpoint}/moto-api/reset-auth", data="0").raise_for_status()  # check credentials from now on
    try:
        with pytest.raises(StorageError, match="refused the credentials.*AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"):
            check_s3_root("s3://study/run")
    finally:
        requests.post(f"{endpoint}/moto-api/reset-auth", data="inf").raise_for_status()

    s3fs.S3FileSystem.clear_instance_cache()
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    with pytest.raises(StorageError, match="does not answer.*Check AWS_ENDPOINT_URL"):
        check_s3_root("s3://study/run")
    assert s3.find("study") == []  # nothing half-written anywhere


def _pool_dagster_home(tmp_path: Path, llm_steps: int = 1) -> Path:
    """A DAGSTER_HOME with resources/dagster_postgres.yaml, its pools' default limit `llm_steps`."""
    home = tmp_path / "dagster_home"
    home.mkdir()
    config = (REPO / "resources" / "dagster_postgres.yaml").read_text()
    assert "default_limit: 1\n" in config
    (home / "dagster.yaml").write_text(config.replace("default_limit: 1\n", f"default_limit: {llm_steps}\n"))
    return home


def _steps(instance, run_id) -> dict:
    """{step: (start, end)} from the run's events."""
    times: dict = {}
    for event in instance.all_logs(run_id):
        kind = event.dagster_event and event.dagster_event.event_type
        if kind in (DagsterEventType.STEP_START, DagsterEventType.STEP_SUCCESS):
            times.setdefault(event.step_key, []).append(event.timestamp)
    return {step: tuple(sorted(t)) for step, t in times.items()}


RPM = 600  # the endpoint's requests per minute in the parallel test: 10 a second


def test_parallel_runs_on_postgresql_share_the_endpoint_and_equal_a_serial_run(subject, tmp_path, monkeypatch):
    """Two layers' runs at once, each step in its own process, two LLM steps at a time (the 'llm'
    pool's slots): together they stay within the endpoint's requests per minute, and the tables are
    a serial run's."""
    shard = "00-63"
    with OracleServer() as server, postgres_server() as pg:
        settings = replace(remote(tiny_settings(subject, tmp_path, layers="0-1", shards=1, workers=2), server),
                           simulation_method="json", llm_rpm=RPM)
        runs = demo_runs(settings, ("00", "01"), [shard])
        for name, value in {**pg, **settings.environment(), "DAGSTER_HOME": str(_pool_dagster_home(tmp_path, llm_steps=2))}.items():
            monkeypatch.setenv(name, value)  # step processes read the same settings and instance
        instance = open_instance(create=False)
        assert type(instance.run_storage).__name__ == "PostgresRunStorage"
        defs = build_definitions(settings)
        materialize_runs(defs, instance, runs[:3], log=lambda _: None)  # weights, corpus, records: in-process
        server.requests.clear()
        server.times.clear()
        materialize_runs(defs, instance, runs[3:5], log=lambda _: None, workers=2)  # the two layers at once
        # Each step sends at most half of RPM, with a burst of one second of its share: within any 5 s
        # both together send at most 5 s of RPM and 2 bursts. Each with the whole of RPM would send
        # about twice that while their simulations overlap.
        requests = len(server.posts())
        assert requests > 150 and server.most_in_window(5.0) <= RPM / 60 * 5 + 2 * RPM / 2 / 60
        materialize_runs(defs, instance, runs[5:], log=lambda _: None)

        parallel = [r for r in instance.get_runs() if r.tags.get("dagster/partition", "").endswith(f"|{shard}")]
        assert sorted(r.tags["dagster/partition"] for r in parallel) == [f"00|{shard}", f"01|{shard}"]
        steps = {r.run_id: _steps(instance, r.run_id) for r in parallel}
        for run in parallel:  # both recorded completely: status, every step, every materialization
            assert instance.get_run_by_id(run.run_id).status == DagsterRunStatus.SUCCESS
            assert set(steps[run.run_id]) == {"explanations", "simulations", "scores"}
            assert all(len(t) == 2 for t in steps[run.run_id].values())
            materialized = {e.dagster_event.asset_key.to_user_string() for e in instance.all_logs(
                run.run_id, of_type=DagsterEventType.ASSET_MATERIALIZATION)}
            assert materialized == {"explanations", "simulations", "scores"}
        records = [instance.get_run_record_by_id(r.run_id) for r in parallel]
        assert max(r.start_time for r in records) < min(r.end_time for r in records)  # in progress at once
        simulating = [s["simulations"] for s in steps.values()]
        assert max(start for start, _ in simulating) < min(end for _, end in simulating)  # two LLM steps at once
        assert LLM_POOL in instance.event_log_storage.get_concurrency_keys()
        storage = TableStorage(root=settings.storage)
        instance.dispose()

        with in_memory_instance() as other:
            serial = run_graph(replace(settings, storage=str(tmp_path / "serial"), workers=1, llm_rpm=0), other,
                               ("00", "01"), [shard])
    for asset, partition in [("explanations", f"00|{shard}"), ("explanations", f"01|{shard}"),
                             ("simulations", f"01|{shard}"), ("scores", f"00|{shard}"), ("scores", f"01|{shard}"),
                             ("layer_summary", "01"), ("model_summary", None)]:
        assert storage.read(asset, partition).equals(serial.read(asset, partition)), (asset, partition)


def test_postgresql_down_names_the_settings(tmp_path, monkeypatch):
    monkeypatch.setenv("DAGSTER_HOME", str(_pool_dagster_home(tmp_path)))
    for name, value in {"NEURON_ASSETS_PG_HOST": "127.0.0.1", "NEURON_ASSETS_PG_PORT": str(free_port()),
                        "NEURON_ASSETS_PG_USER": "unit", "NEURON_ASSETS_PG_PASSWORD": "unused",
                        "NEURON_ASSETS_PG_DB": "dagster"}.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(InstanceError, match="cannot connect to the PostgreSQL.*NEURON_ASSETS_PG_PORT=.*"
                                            "Start PostgreSQL there, or fix NEURON_ASSETS_PG_HOST"):
        open_instance(create=False)
    monkeypatch.delenv("NEURON_ASSETS_PG_HOST")
    with pytest.raises(InstanceError, match="NEURON_ASSETS_PG_HOST"):
        open_instance(create=False)


def test_killed_run_leaves_no_partial_file_and_finished_neurons_are_not_recomputed(subject, served, tmp_path,
                                                                                       monkeypatch):
    monkeypatch.setenv("NEURON_ASSETS_EXPLAINER_API_KEY", KEY)
    monkeypatch.setenv("NEURON_ASSETS_SIMULATOR_API_KEY", KEY)
    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy(REPO / "resources" / "dagster.yaml", home / "dagster.yaml")
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    with FakeOpenAIServer(served, api_key=KEY, digit_bias=6.0) as server:
        settings = remote(tiny_settings(subject, tmp_path, layers="0", neurons="first:4", llm_concurrency=1), server)
        for name, value in settings.environment().items():
            monkeypatch.setenv(name, value)
        instance = DagsterInstance.get()
        defs = build_definitions(settings)
        cache = Path(settings.storage) / "llm_cache"

        # `neuron-assets demo`, killed mid-shard: after some of the shard's answers are cached.
        server.script(["slow:0.5"] * 4)
        demo = subprocess.Popen([Path(sys.executable).parent / "neuron-assets", "demo", "--layers", "00"],
                                cwd=tmp_path, start_new_session=True, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 240
        while len(list(cache.rglob("*.json"))) < 2:
            assert demo.poll() is None and time.monotonic() < deadline, "the demo ended before it could be killed"
            time.sleep(0.05)
        os.killpg(demo.pid, signal.SIGKILL)
        demo.wait()
        finished = len(list(cache.rglob("*.json")))
        requested = len(server.posts())

        storage = TableStorage(root=settings.storage)
        assert not storage.exists("explanations", f"00|{SHARD}")  # the killed step wrote no table at all
        files = [p for p in Path(settings.storage).rglob("*") if p.is_file()]
        assert not [p for p in files if p.name.endswith(".tmp")]
        for path in files:  # everything visible is whole
            if path.suffix == ".parquet":
                pl.read_parquet(path)
            elif path.suffix == ".json":
                assert path.read_text().startswith("{") and path.read_text().endswith("}")

        killed = instance.get_runs()[0]
        assert killed.status == DagsterRunStatus.STARTED and killed.tags["dagster/partition"] == f"00|{SHARD}"
        messages = []
        materialize_runs(defs, instance, demo_runs(settings, ("00",), [SHARD]), log=messages.append)
        # The dead run gave back its 'llm' pool slot; otherwise this run would wait for it forever.
        assert instance.get_run_by_id(killed.run_id).status == DagsterRunStatus.FAILURE
        assert f"run {killed.run_id}: its process" in messages[0] and "pool slots given back" in messages[0]
        rerun = len(server.posts()) - requested
        total = len(list(cache.rglob("*.json")))  # every distinct request the shard needs, answered once
        assert finished >= 2 and rerun == total - finished  # what finished before the kill is not asked again
        event = instance.get_latest_materialization_event(AssetKey("explanations")).asset_materialization
        assert event.metadata[CACHE_HITS].value >= 1
        assert storage.read("scores", f"00|{SHARD}").height > 0
        instance.dispose()


def test_k8s_files_fit_dagster_k8s_and_our_settings(subject, tmp_path):
    import yaml
    from dagster._config import process_config
    from dagster_k8s import k8s_job_executor

    from neuron_assets.definitions import K8S_EXECUTOR
    from neuron_assets.settings import SETTINGS

    schema = k8s_job_executor.config_schema.as_field().config_type
    config = yaml.safe_load(K8S_EXECUTOR.read_text())
    assert process_config(schema, config).success
    assert not process_config(schema, {**config, "max_concurent": 4}).success  # the check can fail
    gpu = config["per_step_k8s_config"]["neuron_records"]["container_config"]["resources"]["limits"]
    assert gpu["nvidia.com/gpu"] == 1 and "nvidia.com/gpu" not in str(config["step_k8s_config"])
    defs = build_definitions(tiny_settings(subject, tmp_path, executor="k8s"))
    assert defs.resolve_implicit_global_asset_job_def().executor_def.name == "k8s_job_executor"
    assert defs.resolve_assets_def("neuron_records").op.name == "neuron_records"  # the per-step key

    names = {s.env for s in SETTINGS} | {"AWS_DEFAULT_REGION"}
    documents = list(yaml.safe_load_all((K8S_EXECUTOR.parent / "configmap.yaml").read_text()))
    documents += list(yaml.safe_load_all((K8S_EXECUTOR.parent / "secrets.example.yaml").read_text()))
    for document in documents:
        if document and document.get("metadata", {}).get("name", "").startswith("neuron-assets"):
            values = document.get("data") or document.get("stringData")
            assert set(values) <= names, set(values) - names
