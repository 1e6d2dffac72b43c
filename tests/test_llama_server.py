"""The OpenAI backend against llama.cpp's own server (`llama-server`, `make llama-server`) serving
the embedded GGUF model: the probe sees what that server can do, and the explain, simulate and
judge stages, the response cache and a server that goes away mid-run work against it."""

import threading
import time
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from llama_server import ALIAS, LlamaServer

from neuron_assets.method.prompts import load_fewshot
from neuron_assets.resources.llm import LLM
from neuron_assets.resources.models import embedded_model_file
from neuron_assets.resources.openai_client import OpenAIEndpoint, _has_prompt_logprobs, reset_shared_limits
from neuron_assets.resources.study import PROMPTS
from neuron_assets.stages.detect import SCHEMA as JUDGED, judge_units
from neuron_assets.stages.explain import SCHEMA as EXPLAINED, explain_units
from neuron_assets.stages.simulate import SCHEMA as SIMULATED, simulate_units
from neuron_assets.stages.variants import explanation_variants

WORDS = [" the", " cat", " sat", " on", " a", " mat"]
UNITS = 1


@pytest.fixture(scope="module")
def server():
    with LlamaServer(embedded_model_file()) as running:
        yield running


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One response cache for the module: a test asks again only what it is the first to ask."""
    return tmp_path_factory.mktemp("llm_cache")


def shard():
    """Unit u fires on word u+1 of 6-word windows; 35 windows each (one unit: the model is slow on a CPU)."""
    tokens, records = {}, {}
    for unit in range(UNITS):
        for i in range(35):
            tokens[unit * 35 + i] = WORDS[i % 6:] + WORDS[:i % 6]
        top = [(unit * 35 + i, np.array([2.0 * (w == WORDS[unit + 1]) for w in tokens[unit * 35 + i]], np.float32))
               for i in range(20)]
        records[unit] = {"top": top, "random": [(unit * 35 + 20 + i, np.zeros(6, np.float32)) for i in range(15)]}
    return records, tokens


def quiet(_state) -> None:
    pass


def llm(server, cache: Path) -> LLM:
    reset_shared_limits()
    return LLM(backend="openai", model=ALIAS, base_url=server.base_url, response_cache=str(cache), max_tokens=40,
               max_concurrency=2, max_retries=1, timeout_s=60)


def explain(model: LLM) -> pl.DataFrame:
    records, tokens = shard()
    return pl.DataFrame(explain_units(0, list(range(UNITS)), records, tokens, None, model,
                                      load_fewshot(f"{PROMPTS}/explainer_fewshot.json"), "p", seed=0,
                                      code_version="c", report=quiet).rows, schema=EXPLAINED)


def variant(explained: pl.DataFrame, name: str) -> pl.DataFrame:
    return explanation_variants([explained], "0|0-0", seed=0, control=False).filter(pl.col("variant") == name)


def stages(model: LLM) -> dict[str, pl.DataFrame]:
    """The llm explanation of the shard, explained, simulated and judged."""
    records, tokens = shard()
    explained = explain(model)
    variants = variant(explained, "llm")
    simulated = simulate_units(variants, records, tokens, None, model,
                               load_fewshot(f"{PROMPTS}/simulator_fewshot.json"), "s", report=quiet)
    judged = judge_units(variants, records, tokens, model, seed=0, code_version="d", report=quiet)
    return {"explanations": explained, "simulations": pl.DataFrame(simulated.rows, schema=SIMULATED),
            "detection": pl.DataFrame(judged.rows, schema=JUDGED)}


def test_the_probe_sees_what_llama_server_offers(server):
    endpoint = OpenAIEndpoint(server.base_url, None, ALIAS)
    text = "The cat sat on the mat."
    # /v1/completions ignores `echo`: it generates a token (even at max_tokens 0) and gives no
    # logprobs of the prompt, and its logprobs come in the chat layout
    reply = endpoint.completion(text, echo=True, logprobs=1, max_tokens=0, temperature=0).body
    assert not _has_prompt_logprobs(reply, text) and reply["usage"]["completion_tokens"] == 1
    assert "content" in reply["choices"][0]["logprobs"] and "tokens" not in reply["choices"][0]["logprobs"]
    assert endpoint.probe() == "chat_logprobs"
    # it serves its one model whatever a request names
    other = OpenAIEndpoint(server.base_url, None, "no-such-model").chat([{"role": "user", "content": "Hi"}], max_tokens=2)
    assert other.body["model"] == ALIAS


def test_explain_simulate_and_judge_through_llama_server_then_again_from_the_cache_alone(server, cache):
    first = stages(llm(server, cache))
    explained = first["explanations"].filter(pl.col("variant") == "llm")
    assert explained["error"].is_null().all() and (explained["text"].str.len_chars() > 0).all()
    assert (explained["tokens_in"] > 0).all() and (explained["tokens_out"] > 0).all()
    simulations = first["simulations"]
    assert simulations.height == UNITS * 20 and set(simulations["method"]) == {"chat_logprobs"}
    # the small model's answers do not always follow the format: a token it gave no value for is
    # counted, never a silent zero
    read = simulations.filter(pl.col("expected").is_not_null())
    assert read.height > 0
    assert ((read["n_failed_tokens"] > 0) == read["error"].is_not_null()).all()
    detection = first["detection"]
    assert detection.height == UNITS and detection["error"].is_null().all()
    assert set(detection["judge_method"]) == {"text"}

    server.stop()  # everything again, from the response cache alone
    try:
        again = stages(llm(server, cache))
    finally:
        server.start()
    for name, table in first.items():
        assert table.drop("cache_hit", strict=False).equals(again[name].drop("cache_hit", strict=False)), name
    assert again["explanations"].filter(pl.col("variant") == "llm")["cache_hit"].all()
    assert again["simulations"]["cache_hit"].all()


def test_a_server_stopped_mid_run_leaves_error_rows_and_a_rerun_completes(server, cache):
    model = llm(server, cache)
    records, tokens = shard()
    variants = variant(explain(model), "token_baseline")  # sequences no other test simulates
    fewshot = load_fewshot(f"{PROMPTS}/simulator_fewshot.json")
    before = len(list(cache.rglob("*.json")))

    def stop_after_some_answers():
        deadline = time.monotonic() + 120
        while len(list(cache.rglob("*.json"))) < before + 5 and time.monotonic() < deadline:
            time.sleep(0.05)
        server.stop()

    stopper = threading.Thread(target=stop_after_some_answers)
    stopper.start()
    broken = pl.DataFrame(simulate_units(variants, records, tokens, None, model, fewshot, "s", report=quiet).rows,
                          schema=SIMULATED)
    stopper.join()
    failed = broken.filter(pl.col("error").str.contains("request failed"))
    assert 0 < failed.height < broken.height  # some answered before the stop, the rest are error rows
    assert failed["expected"].is_null().all() and failed["error"].str.contains("connection error").all()

    server.start()
    answered = len(list(cache.rglob("*.json")))
    rerun = simulate_units(variants, records, tokens, broken, model, fewshot, "s", report=quiet)
    rows = pl.DataFrame(rerun.rows, schema=SIMULATED)
    assert not rows["error"].fill_null("").str.contains("request failed").any()
    assert rows.height == broken.height
    assert rerun.cache_hits >= answered - before  # what was answered before the stop is not asked again
