"""The token-by-token simulator (one forward call per token) against the all-at-once one."""

import numpy as np
import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from neuron_assets.resources.local_llm import LocalSimulator
from test_local_llm import PREFIX, make_sequence
from tiny_models import build_tiny_model

# Different lengths in one call, and an empty sequence between them.
SEQUENCES = [make_sequence(6, 0), [], make_sequence(1, 7), make_sequence(11, 3)]


@pytest.mark.parametrize(
    "arch, ten_is_one_token, mode",
    [
        ("llama", False, "chain"),
        ("gpt2", False, "chain"),
        ("llama", True, "direct"),
        ("gpt_neox", True, "direct"),
    ],
)
def test_token_by_token_equals_all_at_once(tmp_path, arch, ten_is_one_token, mode):
    path = build_tiny_model(arch, tmp_path, ten_is_one_token=ten_is_one_token)
    model, tokenizer = AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)
    sim = LocalSimulator(model, tokenizer, PREFIX, batch_size=2)
    assert sim.mode == mode

    calls = []
    handle = model.register_forward_hook(
        lambda mod, args, kwargs, out: calls.append(kwargs["input_ids"].shape), with_kwargs=True
    )
    try:
        slow = sim.simulate_token_by_token(SEQUENCES)
    finally:
        handle.remove()
    fast = sim.simulate(SEQUENCES)

    assert [s.shape for s in slow] == [(len(q), 11) for q in SEQUENCES]
    for s, f in zip(slow, fast):
        assert s.dtype == np.float64
        np.testing.assert_allclose(s, f, atol=1e-5, rtol=0)
        np.testing.assert_allclose(s, f, rtol=1e-4, atol=1e-12)  # small probabilities, relatively
    # One call per token, batch of 1, never re-reading the prefix.
    assert len(calls) == sum(len(q) for q in SEQUENCES)
    assert all(shape[0] == 1 and shape[1] < sim.prefix_tokens for shape in calls)
    # The comparison has teeth: probabilities vary across positions far beyond the tolerance,
    # so reading at a neighbouring position would show.
    assert np.log(np.concatenate(slow)).std(axis=0).min() > 0.05
