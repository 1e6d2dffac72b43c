"""An endpoint that misbehaves: one that throttles slows the whole step without errors, one that
drops connections gives error rows after the retries in bounded time (and a rerun completes), and a
wrong model name is one clear error naming its setting, not a row per request."""

import time
from dataclasses import replace

import numpy as np
import polars as pl
import pytest
from oracle_server import OracleServer
from pipeline import in_memory_instance, remote, run_graph, tiny_settings
from tiny_models import build_tiny_model

from neuron_assets.method.prompts import load_fewshot
from neuron_assets.resources.llm import LLM
from neuron_assets.resources.openai_client import WrongModelError, reset_shared_limits
from neuron_assets.resources.study import PROMPTS
from neuron_assets.stages.explain import SCHEMA, explain_units
from neuron_assets.stages.simulate import SCHEMA as SIMULATED, simulate_units
from neuron_assets.stages.variants import explanation_variants

WORDS = [" red", " green", " blue", " cyan", " pink", " gold", " gray", " teal"]
UNITS = 4


def shard():
    """Unit u's top records peak on word u; 35 windows each."""
    tokens, records = {}, {}
    for unit in range(UNITS):
        for i in range(35):
            tokens[unit * 35 + i] = [WORDS[(i + j) % len(WORDS)] for j in range(len(WORDS))]
        top = [(unit * 35 + i, np.array([3.0 * (w == WORDS[unit]) for w in tokens[unit * 35 + i]], dtype=np.float32))
               for i in range(20)]
        records[unit] = {"top": top, "random": [(unit * 35 + 20 + i, np.zeros(len(WORDS), np.float32))
                                                for i in range(15)]}
    return records, tokens


def quiet(_state) -> None:
    pass


def llm(server, **fields) -> LLM:
    reset_shared_limits()
    return LLM(backend="openai", model="oracle", base_url=server.base_url, simulation_method="json", **fields)


def explain(explainer) -> pl.DataFrame:
    records, tokens = shard()
    result = explain_units(0, list(range(UNITS)), records, tokens, None, explainer,
                           load_fewshot(f"{PROMPTS}/explainer_fewshot.json"), "p", seed=0, code_version="c",
                           report=quiet)
    return pl.DataFrame(result.rows, schema=SCHEMA)


def simulate(simulator, explained: pl.DataFrame) -> pl.DataFrame:
    records, tokens = shard()
    variants = explanation_variants([explained], "0|0-3", seed=0, control=False)
    result = simulate_units(variants, records, tokens, None, simulator,
                            load_fewshot(f"{PROMPTS}/simulator_fewshot.json"), "s", report=quiet)
    return pl.DataFrame(result.rows, schema=SIMULATED)


def test_a_throttling_endpoint_pauses_every_request_of_the_step_and_nothing_fails():
    with OracleServer() as server:
        explained = explain(llm(server))
        simulator = llm(server, max_concurrency=8, max_retries=1)
        # the first request is throttled for 0.5 s; the 7 others in flight then take 0.1 s: when they
        # are done the pause holds, so the next requests wait for its end
        server.times.clear()
        server.script(["429:0.5"] + ["slow:0.1"] * 7)
        rows = simulate(simulator, explained)
        first = min(server.times)
        assert not [t - first for t in server.times if 0.2 < t - first < 0.4]  # nobody sent while paused
        assert rows.height == 2 * UNITS * 20 and rows["error"].is_null().all()  # one retry allowed, not used up
        assert max(server.times) - first > 0.45


def test_dropped_connections_are_error_rows_in_bounded_time_and_a_rerun_completes(tmp_path):
    with OracleServer() as server:
        explainer = llm(server, max_retries=2, response_cache=str(tmp_path / "cache"))
        server.script(["drop"] * 1000)
        started = time.monotonic()
        failed = explain(explainer)
        assert time.monotonic() - started < 20  # 3 attempts a request, backoff of at most 0.5 s and 1 s
        llm_rows = failed.filter(pl.col("variant") == "llm")
        assert llm_rows.height == UNITS and llm_rows["text"].is_null().all()
        assert llm_rows["error"].str.contains("connection error").all()
        assert llm_rows["error"].str.contains("gave up after 3 attempts").all()
        server.script([])
        server._script.clear()
        again = explain(explainer).filter(pl.col("variant") == "llm")
        assert again["error"].is_null().all() and again["text"].str.contains("the token").all()


def test_a_wrong_model_name_is_one_error_naming_its_setting():
    with OracleServer(only_model=True) as server:
        wrong = llm(server, max_concurrency=2, model_setting="NEURON_ASSETS_EXPLAINER_MODEL")
        wrong = wrong.model_copy(update={"model": "orcale"})
        with pytest.raises(WrongModelError, match=r"has no model 'orcale' .*set NEURON_ASSETS_EXPLAINER_MODEL to a "
                                                  r"model this endpoint serves"):
            explain(wrong)
        assert len(server.posts()) <= 2  # the requests in flight when the first answer came, no more
        with pytest.raises(WrongModelError, match="NEURON_ASSETS_EXPLAINER_MODEL"):
            simulate(wrong, explain(llm(server)))


def test_a_wrong_simulator_model_fails_the_step_with_that_message(tmp_path):
    model = build_tiny_model("gpt2", tmp_path / "model", n_layers=1, max_positions=32)
    with OracleServer(only_model=True, model_name="gpt-4o-mini") as server:
        settings = replace(remote(tiny_settings(model, tmp_path, layers="0", shards=1), server),
                           simulation_method="json", simulator_model="gpt-4o-minii")
        with in_memory_instance() as instance, pytest.raises(SystemExit) as failed:
            run_graph(settings, instance, ("00",))
    assert "has no model 'gpt-4o-minii'" in str(failed.value)
    assert "set NEURON_ASSETS_SIMULATOR_MODEL to a model this endpoint serves" in str(failed.value)
