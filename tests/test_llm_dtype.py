"""A local LLM's number format (NEURON_ASSETS_EXPLAINER_DTYPE, NEURON_ASSETS_SIMULATOR_DTYPE): the
model runs in it, its answers are cached apart from those of the device's own format, and a pinned
format enters its LLM's version where 'auto' does not."""

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_models import build_tiny_model

from neuron_assets.method.prompts import load_fewshot, simulator_segments
from neuron_assets.resources.llm import LLM
from neuron_assets.resources.models import load_causal_lm
from neuron_assets.settings import Settings
from neuron_assets.versions import source_versions

FEWSHOT = Path(__file__).resolve().parents[1] / "resources" / "prompts" / "simulator_fewshot.json"
WINDOWS = [["the", " cat", " sat", " on", " the", " mat"], ["a", " cat", " ran"], ["for", " each", " item"]]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return build_tiny_model("llama", tmp_path_factory.mktemp("dtype"), n_layers=1, max_positions=4096)


def simulated(llm: LLM):
    engine = llm.simulation(load_fewshot(FEWSHOT))
    return engine.simulate_many([("the word cat", [simulator_segments("the word cat", w) for w in WINDOWS])])[0]


def test_bfloat16_runs_the_model_in_it_near_float32_and_is_cached_apart(model, tmp_path):
    common = {"backend": "local", "model": str(model), "device": "cpu", "cache": str(tmp_path / "models"),
              "response_cache": str(tmp_path / "llm_cache")}
    auto, pinned32, bf16 = LLM(**common), LLM(**common, dtype="float32"), LLM(**common, dtype="bfloat16")
    assert load_causal_lm(str(model), common["cache"], "cpu")[0].dtype == torch.float32
    assert load_causal_lm(str(model), common["cache"], "cpu", dtype="bfloat16")[0].dtype == torch.bfloat16
    assert "bfloat16" in bf16.label and "float32" not in auto.label

    first = simulated(auto)
    assert not any(s.usage.cache_hit for s in first)
    assert all(s.usage.cache_hit for s in simulated(pinned32))  # float32 is a CPU's own format: the same entries
    low = simulated(bf16)
    assert not any(s.usage.cache_hit for s in low), "bfloat16 answers were read from float32's cache entries"
    # the same simulation, rounded differently: expected values (0-10) move, but only a little
    differences = np.concatenate([np.abs(a.expected - b.expected) for a, b in zip(first, low)])
    assert 0 < differences.max() < 0.5 and all(s.error is None for s in low)
    assert all(s.usage.cache_hit for s in simulated(bf16))

    answer, = bf16.complete([[{"role": "user", "content": "Describe the word cat."}]], [0], max_tokens=4)
    assert answer.error is None and answer.usage.tokens_out > 0


@pytest.mark.parametrize("role", ["explainer", "simulator"])
def test_a_pinned_format_enters_its_llms_version_and_auto_does_not(role):
    base = Settings.from_env({})
    versions = source_versions(base)
    for dtype in ("float32", "bfloat16"):
        changed = source_versions(replace(base, **{f"{role}_dtype": dtype}))
        assert {s for s in versions if changed[s] != versions[s]} == {role}, dtype
    # an endpoint's model has no number format of ours
    remote = replace(base, **{f"{role}_backend": "openai", f"{role}_model": "gpt-4o-mini"})
    assert source_versions(replace(remote, **{f"{role}_dtype": "bfloat16"})) == source_versions(remote)
