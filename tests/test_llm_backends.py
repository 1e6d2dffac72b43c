"""The asset graph with the explainer and simulator behind a real OpenAI-compatible HTTP server."""

from dataclasses import replace
from pathlib import Path

import polars as pl
import pytest
from dagster import AssetKey
from openai_server import FakeOpenAIServer
from pipeline import demo_runs, in_memory_instance, remote, tiny_settings
from tiny_models import build_tiny_model

from neuron_assets.runs import materialize_runs
from neuron_assets.definitions import build_definitions
from neuron_assets.resources.storage import TableStorage
from neuron_assets.assets.common import CACHE_HITS, CACHE_MISSES, REUSED

KEY = "sk-test-not-a-real-key-4217"
SHARD = "00-31"


@pytest.fixture(scope="module")
def subject(tmp_path_factory):
    return build_tiny_model("gpt2", tmp_path_factory.mktemp("subject") / "gpt2", n_layers=1, max_positions=4096)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    return build_tiny_model("llama", tmp_path_factory.mktemp("served") / "llama", n_layers=1, max_positions=4096)


def remote_settings(subject, tmp, server, **overrides):
    return replace(remote(tiny_settings(subject, tmp), server), **overrides)


def data_versions(instance) -> dict:
    return {asset: instance.get_latest_materialization_event(AssetKey(asset)).asset_materialization.tags[
        "dagster/data_version"] for asset in ("explanations", "simulations", "scores")}


def run(settings, instance, runs):
    materialize_runs(build_definitions(settings), instance, runs, log=lambda _: None)
    return TableStorage(root=settings.storage)


def test_openai_backend_all_at_once_cost_and_cache(subject, served, tmp_path, monkeypatch):
    monkeypatch.setenv("NEURON_ASSETS_EXPLAINER_API_KEY", KEY)
    monkeypatch.setenv("NEURON_ASSETS_SIMULATOR_API_KEY", KEY)
    with FakeOpenAIServer(served, api_key=KEY, digit_bias=6.0) as server, in_memory_instance() as instance:
        settings = remote_settings(subject, tmp_path, server)
        storage = run(settings, instance, demo_runs(settings, ("00",), [SHARD]))
        explanations = storage.read("explanations", f"00|{SHARD}").filter(pl.col("variant") == "llm")
        assert explanations["tokens_in"].min() > 0 and explanations["cost_usd"].min() > 0  # gpt-4o-mini is priced
        sims = storage.read("simulations", f"00|{SHARD}")
        assert set(sims["method"]) == {"all_at_once"}
        assert sims["expected"].is_not_null().all()  # every sequence read, despite split characters
        assert sims.filter(pl.col("error").is_null()).height > 0
        assert storage.read("model_summary")["cost_usd"].sum() > 0
        completions = len(server.posts("/completions"))
        assert completions >= 10  # one prompt-logprobs request per simulated sequence (plus the probe)

        before = len(server.requests)
        versions = data_versions(instance)
        run(settings, instance, [(("explanations", "simulations", "scores"), f"00|{SHARD}")])
        assert len(server.requests) == before  # unchanged neurons are reused: no request at all
        assert data_versions(instance) == versions  # identical tables: nothing downstream turns stale
        event = instance.get_latest_materialization_event(AssetKey("simulations")).asset_materialization
        clean = sims.group_by("unit", "variant").agg(pl.col("error").is_null().all().alias("ok"))["ok"].sum()
        assert clean >= 1 and event.metadata[REUSED].value == clean  # failed ones are retried

        for asset in ("explanations", "simulations"):  # lose the tables, keep the response cache
            storage.path(asset, f"00|{SHARD}").unlink()
        run(settings, instance, [(("explanations", "simulations", "scores"), f"00|{SHARD}")])
        assert len(server.requests) == before  # every answer from the persistent response cache
        again = storage.read("explanations", f"00|{SHARD}").filter(pl.col("variant") == "llm")
        assert again["cache_hit"].all() and again["text"].to_list() == explanations["text"].to_list()
        event = instance.get_latest_materialization_event(AssetKey("simulations")).asset_materialization
        assert event.metadata[CACHE_MISSES].value == 0 and event.metadata[CACHE_HITS].value > 0

    written = [p for p in Path(settings.storage).rglob("*") if p.is_file()]
    assert any("llm_cache" in str(p) for p in written)
    assert not [p for p in written if KEY.encode() in p.read_bytes()]  # the key is never stored


@pytest.mark.parametrize("completions, chat_logprobs, method",
                         [(False, True, "chat_logprobs"), (False, False, "json")])
def test_probe_picks_the_best_method_the_endpoint_supports(subject, served, tmp_path, completions, chat_logprobs, method):
    with FakeOpenAIServer(served, completions=completions, chat_logprobs=chat_logprobs, digit_bias=6.0) as server, \
            in_memory_instance() as instance:
        settings = remote_settings(subject, tmp_path, server, neurons="first:1")
        storage = run(settings, instance, demo_runs(settings, ("00",), [SHARD]))
        sims = storage.read("simulations", f"00|{SHARD}")
        assert set(sims["method"]) == {method}
        summary = storage.read("layer_summary", "00")
        assert set(summary["method"]) == {method}
        # whatever the tiny model answers, nothing is a silent zero: values or an error
        for expected, error in sims.select("expected", "error").iter_rows():
            assert error is not None or (expected is not None and any(v != 0 for v in expected))


def test_failing_requests_become_error_rows_and_the_shard_completes(subject, served, tmp_path):
    with FakeOpenAIServer(served, digit_bias=6.0) as server, in_memory_instance() as instance:
        settings = remote_settings(subject, tmp_path, server, llm_retries=0, llm_concurrency=1)
        run(settings, instance, demo_runs(settings, ("00",), [SHARD])[:3])  # weights, corpus and records first
        server.script(["500"])  # the first explainer request fails, with no retry left
        storage = run(settings, instance, [(("explanations", "simulations", "scores"), f"00|{SHARD}")])
        llm = storage.read("explanations", f"00|{SHARD}").filter(pl.col("variant") == "llm").sort("unit")
        assert llm["error"][0] is not None and "500" in llm["error"][0]
        assert llm["error"][1] is None  # the other neuron was explained
        scores = storage.read("scores", f"00|{SHARD}")
        assert scores.height == 4 and scores.filter(pl.col("error").is_null()).height >= 1


def test_llm_steps_that_may_run_at_once_share_the_endpoint_limits():
    """With the 'llm' pool at 3 slots, a step's LLM takes a third of each limit (at least 1; 0, no
    limit, stays 0), so that 3 step processes together stay within the endpoint's limits."""
    import dagster as dg

    from neuron_assets.resources.llm import LLM, LLM_POOL
    from neuron_assets.resources.openai_client import reset_shared_limits

    reset_shared_limits()
    seen = {}

    @dg.asset(pool=LLM_POOL)
    def calls_the_llm(llm: LLM) -> None:
        seen["limits"] = llm.limits()
        limits = llm.endpoint().limits  # what the endpoint's requests wait on
        seen["endpoint"] = (limits.requests.per_minute, limits.tokens, limits.max_concurrency)

    llm = LLM(backend="openai", model="m", base_url="http://127.0.0.1:9/v1", requests_per_minute=600,
              tokens_per_minute=0, max_concurrency=2)
    with in_memory_instance() as instance:
        dg.materialize([calls_the_llm], instance=instance, resources={"llm": llm})
        assert seen["limits"] == {"requests_per_minute": 600, "tokens_per_minute": 0, "max_concurrency": 2}
        instance.event_log_storage.set_concurrency_slots(LLM_POOL, 3)
        dg.materialize([calls_the_llm], instance=instance, resources={"llm": llm})
    assert seen["limits"] == {"requests_per_minute": 200, "tokens_per_minute": 0, "max_concurrency": 1}
    assert seen["endpoint"] == (200, None, 1)
    reset_shared_limits()
