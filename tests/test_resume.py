"""Resume inside a shard: the local backend's answers and simulations live in the same persistent,
content-addressed response cache as remote ones, written as each batch finishes, so a rerun after
SIGINT or SIGKILL makes no model call for the units that finished before it.

Model calls are counted with forward hooks on the real model in this process, and, for runs of
`neuron-assets demo` in a subprocess, by the cache entries and the cache hit counts the run records.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from dagster import AssetKey, DagsterInstance
from pipeline import tiny_settings
from tiny_models import build_tiny_model

from neuron_assets.assets.common import CACHE_HITS, CACHE_MISSES
from neuron_assets.definitions import build_definitions
from neuron_assets.method.prompts import clean_explanation, load_fewshot
from neuron_assets.resources.llm import LLM
from neuron_assets.resources.models import load_causal_lm
from neuron_assets.resources.storage import TableStorage
from neuron_assets.resources.study import PROMPTS
from neuron_assets.runs import materialize_runs

REPO = Path(__file__).resolve().parents[1]
SHARD = "00|00-31"
UNITS = 32  # the whole shard: four explainer batches of 8

CONVERSATIONS = [[{"role": "user", "content": f"Name a Python keyword that starts with {letter}."}]
                 for letter in "abcw"]
SEQUENCES = [["for", " each", " item"], ["while", " True", ":", " break"], ["class", " A"]]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return build_tiny_model("llama", tmp_path_factory.mktemp("llm") / "llama", n_layers=1, max_positions=4096)


class ForwardCount:
    """Forward passes of the model that `load_causal_lm` holds for `llm` (the one it computes with)."""

    def __init__(self, llm: LLM):
        self.calls = 0
        lm, _ = load_causal_lm(llm.model, llm.cache, llm.device)
        self.handle = lm.register_forward_pre_hook(self._count)

    def _count(self, module, args):
        self.calls += 1

    def close(self):
        self.handle.remove()


@pytest.fixture
def llm(model, tmp_path):
    llm = LLM(backend="local", model=str(model), device="cpu", cache=str(tmp_path / "models"), max_tokens=6,
              batch_size=2, response_cache=str(tmp_path / "llm_cache"))
    counter = ForwardCount(llm)
    yield llm, counter
    counter.close()


def entries(root) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in root.rglob("*.json")}


def test_local_answers_are_cached_per_batch_and_reused_with_no_model_call(llm, tmp_path):
    llm, forwards = llm
    first = llm.complete(CONVERSATIONS, seeds=[7, 8, 9, 10])
    assert forwards.calls > 0 and not any(a.usage.cache_hit for a in first)
    (entry,) = entries(tmp_path / "llm_cache").values()  # one entry for the batch, written as it finished
    assert entry["backend"] == "local" and entry["task"] == "generate" and entry["seed"] == 7
    assert [a["text"] for a in entry["response"]["answers"]] == [a.text for a in first]

    calls = forwards.calls
    again = LLM(**llm.model_dump()).complete(CONVERSATIONS, seeds=[7, 8, 9, 10])  # another resource: persistent
    assert forwards.calls == calls, "a cached batch must not reach the model"
    assert [(a.text, a.usage.tokens_in, a.usage.tokens_out) for a in again] == \
        [(a.text, a.usage.tokens_in, a.usage.tokens_out) for a in first]
    assert all(a.usage.cache_hit for a in again)

    # What decides the answer is in the key: another seed, temperature or batch is asked again.
    llm.complete(CONVERSATIONS, seeds=[8, 9, 10, 11])
    llm.complete(CONVERSATIONS, seeds=[7, 8, 9, 10], temperature=0.0)
    llm.complete(CONVERSATIONS[:3], seeds=[7, 8, 9])
    assert len(entries(tmp_path / "llm_cache")) == 4 and forwards.calls > calls

    # Without a response cache every call reaches the model and nothing is written.
    uncached = LLM(**{**llm.model_dump(), "response_cache": None})
    calls = forwards.calls
    assert not any(a.usage.cache_hit for a in uncached.complete(CONVERSATIONS, seeds=[7, 8, 9, 10]))
    assert forwards.calls > calls and len(entries(tmp_path / "llm_cache")) == 4


def test_local_simulations_are_cached_per_sequence_bit_for_bit(llm, tmp_path):
    llm, forwards = llm
    simulation = llm.simulation(load_fewshot(f"{PROMPTS}/simulator_fewshot.json"))
    calls = forwards.calls  # the few-shot prefix is encoded once, when the simulator is made
    first = simulation.simulate("loops", SEQUENCES)
    assert forwards.calls > calls and not any(s.usage.cache_hit for s in first)
    stored = entries(tmp_path / "llm_cache")
    assert len(stored) == len(SEQUENCES) and {e["task"] for e in stored.values()} == {"simulate"}

    calls = forwards.calls
    again = simulation.simulate("loops", SEQUENCES)
    assert forwards.calls == calls, "cached sequences must not reach the model"
    assert all(s.usage.cache_hit for s in again)
    for a, b in zip(first, again):  # the very floats the model gave
        assert a.expected.tobytes() == b.expected.tobytes() and a.n_failed == b.n_failed

    # One new sequence among cached ones: only it is computed, and only it is written.
    mixed = simulation.simulate("loops", [*SEQUENCES[:2], ["if", " x"]])
    assert forwards.calls > calls
    assert [s.usage.cache_hit for s in mixed] == [True, True, False]
    assert mixed[0].expected.tobytes() == first[0].expected.tobytes()
    assert len(entries(tmp_path / "llm_cache")) == len(SEQUENCES) + 1
    # Another explanation is another prompt: asked again; a sequence given twice is computed once.
    calls = forwards.calls
    other = simulation.simulate("classes", [SEQUENCES[0], SEQUENCES[0]])
    assert [s.usage.cache_hit for s in other] == [False, True] and forwards.calls > calls
    assert other[0].expected.tobytes() == other[1].expected.tobytes()
    assert not np.array_equal(other[0].expected, first[0].expected)
    assert len(entries(tmp_path / "llm_cache")) == len(SEQUENCES) + 2


# ----------------------------------------------------------------------------- a shard interrupted


@pytest.fixture(scope="module")
def subject(tmp_path_factory):
    return build_tiny_model("gpt2", tmp_path_factory.mktemp("subject") / "gpt2", n_layers=1)


@pytest.fixture(scope="module")
def explainer(tmp_path_factory):
    """A Llama that decodes a batch's rows one after another on a CPU, large enough that a batch
    takes a while: the interrupt lands while the shard's later batches are still being generated."""
    return build_tiny_model("llama", tmp_path_factory.mktemp("explainer") / "llama", n_layers=2, hidden=128,
                            intermediate=256, max_positions=4096)


def cached(cache: Path, task: str) -> dict[Path, bytes]:
    """The cache entries of one task ('generate': a batch of explanations; 'simulate': a sequence)."""
    found = {p: p.read_bytes() for p in cache.rglob("*.json")}
    return {p: data for p, data in found.items() if json.loads(data)["task"] == task}


def answers(entries: dict[Path, bytes]) -> list:
    """The model's answers in `entries`: an explanation text, or a sequence's distribution."""
    out = []
    for data in entries.values():
        response = json.loads(data)["response"]
        out += [a["text"] for a in response["answers"]] if "answers" in response else [response]
    return out


@pytest.mark.parametrize("interrupt, asset, task", [(signal.SIGINT, "explanations", "generate"),
                                                    (signal.SIGKILL, "simulations", "simulate")],
                         ids=["SIGINT-explaining", "SIGKILL-simulating"])
def test_a_rerun_after_an_interrupt_asks_the_model_only_for_unfinished_units(subject, explainer, tmp_path,
                                                                              monkeypatch, interrupt, asset, task):
    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy(REPO / "resources" / "dagster.yaml", home / "dagster.yaml")
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    settings = tiny_settings(subject, tmp_path, layers="0", neurons=f"first:{UNITS}", explainer_model=explainer,
                             simulator_model=explainer)
    for name, value in settings.environment().items():
        monkeypatch.setenv(name, value)
    cache = Path(settings.storage) / "llm_cache"

    # `neuron-assets demo` on the local backend, interrupted as soon as the step has cached its
    # first answer (Ctrl-C reaches the whole foreground process group).
    log = tmp_path / "demo.log"
    with log.open("w") as out:
        demo = subprocess.Popen([Path(sys.executable).parent / "neuron-assets", "demo", "--layers", "00"],
                                cwd=tmp_path, start_new_session=True, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 240
    while not cached(cache, task):
        assert demo.poll() is None, f"the demo ended before it could be interrupted: {log.read_text()[-2000:]}"
        assert time.monotonic() < deadline, f"no {asset} answer was cached in 240 s"
        time.sleep(0.02)
    os.killpg(demo.pid, interrupt)
    assert demo.wait(timeout=120) != 0, log.read_text()[-2000:]
    if interrupt == signal.SIGINT:  # one line says what was kept and how to go on
        assert "neuron-assets: interrupted. Every partition that finished is stored" in log.read_text()
    storage = TableStorage(root=settings.storage)
    assert not storage.exists(asset, SHARD), "the interrupted step must not have written its table"
    kept = cached(cache, task)
    finished = answers(kept)

    instance = DagsterInstance.get()
    started = time.monotonic()
    materialize_runs(build_definitions(settings), instance, [(("explanations", "simulations", "scores"), SHARD)],
                     log=lambda _: None)
    print(f"rerun after {signal.Signals(interrupt).name} in {asset}: {time.monotonic() - started:.1f} s, "
          f"{len(finished)} answers from before the interrupt")

    metadata = instance.get_latest_materialization_event(AssetKey(asset)).asset_materialization.metadata
    after = cached(cache, task)
    assert all(after[p] == data for p, data in kept.items()), "a finished unit was computed again"
    computed = answers({p: data for p, data in after.items() if p not in kept})
    assert metadata[CACHE_MISSES].value == len(computed)  # each model call left its one answer
    assert 0 < len(finished) and len(computed) > 0, "the interrupt did not land inside the shard's step"
    if asset == "explanations":
        assert metadata[CACHE_HITS].value == len(finished) and len(finished) + len(computed) == UNITS
        llm = storage.read("explanations", SHARD).filter(pl.col("variant") == "llm").sort("unit")
        # Batches go in unit order: the first units' answers, as the model gave them before the interrupt.
        assert llm["cache_hit"].to_list() == [True] * len(finished) + [False] * len(computed)
        assert llm["text"].to_list()[: len(finished)] == [clean_explanation(text) or None for text in finished]
    else:  # one entry per sequence; a sequence repeated for one explanation is a hit in the same run too
        sims = storage.read("simulations", SHARD).filter(pl.col("seq_id").is_not_null())
        assert metadata[CACHE_HITS].value == sims["cache_hit"].sum() == sims.height - len(computed) >= len(finished)
    assert storage.read("scores", SHARD).height > 0
    instance.dispose()
