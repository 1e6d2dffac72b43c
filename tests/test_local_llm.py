"""The in-process explainer / simulator against naive, cache-free references on tiny random models."""

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from neuron_assets.resources.local_llm import LocalSimulator, chat_text, generate_texts, value_token_ids
from tiny_models import build_tiny_model

PREFIX = (
    "We study neurons. Predict activations 0-10 for each token; unknown marks an unknown value.\n"
    "Neuron 1\nExplanation: the word class\n<start>\nthe\tunknown\nclass\t10\nis\t0\nfor\t1\n<end>\n"
    "Neuron 2\nExplanation: loops\n<start>\n"
)
WORDS = "for each item in the list while the loop is running break out of it if the value".split()


def make_sequence(n: int, offset: int = 0) -> list[str]:
    """Segments as the prompt builder writes them: each ends with TAB, where a value would go."""
    words = [WORDS[(offset + i) % len(WORDS)] for i in range(n)]
    return [f"{words[0]}\t"] + [f"unknown\n{w}\t" for w in words[1:]]


SEQUENCES = [make_sequence(n, offset) for n, offset in [(5, 0), (12, 3), (1, 7), (8, 2), (3, 9)]]


def load(path):
    return AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """One (model, tokenizer) per (arch, ten_is_one_token), built on first use."""
    built = {}

    def get(arch: str, ten_is_one_token: bool = False):
        key = (arch, ten_is_one_token)
        if key not in built:
            path = tmp_path_factory.mktemp(f"{arch}-{int(ten_is_one_token)}")
            built[key] = load(build_tiny_model(arch, path, ten_is_one_token=ten_is_one_token))
        return built[key]

    return get


# ----------------------------------------------------------------------------- reference


def next_token_probs(model, ids: list[int]) -> torch.Tensor:
    """Full forward, no cache, no batching: softmax at every position, float64."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0]
    return torch.softmax(logits.double(), dim=-1)


def reference_simulation(model, tokenizer, prefix: str, segments: list[str]) -> np.ndarray:
    """The definition, computed the slow way: the whole prompt per sequence, and for chain
    mode one more full forward per read position with a literal "1" appended."""
    digit = [tokenizer.convert_tokens_to_ids(str(v)) for v in range(10)]
    ids = tokenizer(prefix)["input_ids"]
    reads = []
    for segment in segments:
        ids = ids + tokenizer(segment, add_special_tokens=False)["input_ids"]
        reads.append(len(ids) - 1)
    probs = next_token_probs(model, ids)[reads]
    out = np.zeros((len(reads), 11))
    ten = tokenizer.convert_tokens_to_ids("10")
    if ten is not None and ten != tokenizer.unk_token_id:  # "10" is a single token
        out[:, :10] = probs[:, digit].numpy()
        out[:, 10] = probs[:, ten].numpy()
        return out
    out[:, :10] = probs[:, digit].numpy()
    for t, r in enumerate(reads):
        z = next_token_probs(model, ids[: r + 1] + [digit[1]])[-1, digit[0]].item()
        out[t, 1] = probs[t, digit[1]].item() * (1 - z)
        out[t, 10] = probs[t, digit[1]].item() * z
    return out


# ----------------------------------------------------------------------------- simulator


@pytest.mark.parametrize(
    "arch, ten_is_one_token, mode",
    [
        ("llama", False, "chain"),
        ("gpt2", False, "chain"),
        ("gpt_neox", False, "chain"),
        ("llama", True, "direct"),
        ("gpt2", True, "direct"),
    ],
)
def test_simulate_matches_cache_free_reference(tiny, arch, ten_is_one_token, mode):
    model, tokenizer = tiny(arch, ten_is_one_token)
    sim = LocalSimulator(model, tokenizer, PREFIX, batch_size=2)  # 5 sequences -> 3 batches
    assert sim.mode == mode
    got = sim.simulate(SEQUENCES)
    assert [g.shape for g in got] == [(len(s), 11) for s in SEQUENCES]
    for segments, g in zip(SEQUENCES, got):
        want = reference_simulation(model, tokenizer, PREFIX, segments)
        assert g.dtype == np.float64
        np.testing.assert_allclose(g, want, atol=1e-5, rtol=0)
        # Most probabilities are far below 1e-5, so compare them relatively as well.
        np.testing.assert_allclose(g, want, rtol=1e-4, atol=1e-12)
    # The comparison has teeth: every value's probability varies across positions far beyond
    # the tolerance, so a wrong mask, position id or read position would show.
    stacked = np.concatenate(got)
    assert np.log(stacked).std(axis=0).min() > 0.05


@pytest.mark.parametrize("custom_mask", [True, False])
def test_a_shared_start_run_once_gives_the_reference_values(tiny, custom_mask):
    """`shared` (an explanation's header) is run once after the prefix; every sequence then
    continues from it, with the values of the whole prompt run without any cache."""
    model, tokenizer = tiny("llama")
    sim = LocalSimulator(model, tokenizer, PREFIX, batch_size=2)
    sim._custom_mask = custom_mask
    shared = "Neuron 4\nExplanation: the word cat.\n<start>\n"
    start = sim.tokens_processed
    got = sim.simulate(SEQUENCES, shared=shared)
    with_shared = sim.tokens_processed - start
    sim.simulate([[shared + s[0], *s[1:]] for s in SEQUENCES])
    # the shared text ran once, not once per sequence
    n_shared = len(tokenizer(shared, add_special_tokens=False)["input_ids"])
    assert sim.tokens_processed - start - 2 * with_shared == (len(SEQUENCES) - 1) * n_shared
    for segments, g in zip(SEQUENCES, got):
        want = reference_simulation(model, tokenizer, PREFIX, [shared + segments[0], *segments[1:]])
        np.testing.assert_allclose(g, want, atol=1e-5, rtol=1e-4)


def test_chain_fallback_without_custom_mask_matches_reference(tiny):
    """The slower path kept for attention kernels that cannot take a custom 4D mask."""
    model, tokenizer = tiny("llama")
    sim = LocalSimulator(model, tokenizer, PREFIX, batch_size=3)
    sim._custom_mask = False
    for segments, g in zip(SEQUENCES[:3], sim.simulate(SEQUENCES[:3])):
        np.testing.assert_allclose(g, reference_simulation(model, tokenizer, PREFIX, segments), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gpt_neox"])
def test_eager_attention_matches_sdpa(tmp_path, arch):
    """The additive 4D mask must work with eager attention too, not only SDPA."""
    path = build_tiny_model(arch, tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    eager = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager")
    sdpa = AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa")
    a = LocalSimulator(eager, tokenizer, PREFIX, batch_size=4).simulate(SEQUENCES)
    b = LocalSimulator(sdpa, tokenizer, PREFIX, batch_size=4).simulate(SEQUENCES)
    for x, y in zip(a, b):
        np.testing.assert_allclose(x, y, atol=1e-6)


def test_prefix_is_computed_once(tiny):
    model, tokenizer = tiny("llama")
    lengths = []
    handle = model.register_forward_hook(lambda mod, args, kwargs, out: lengths.append(kwargs["input_ids"].shape), with_kwargs=True)
    try:
        sim = LocalSimulator(model, tokenizer, PREFIX, batch_size=2)
        prefix_ids = tokenizer(PREFIX)["input_ids"]
        assert prefix_ids[0] == tokenizer.bos_token_id  # the llama tokenizer adds BOS
        assert sim.prefix_tokens == len(prefix_ids)
        assert lengths == [torch.Size([1, sim.prefix_tokens])]
        assert sim.tokens_processed == sim.prefix_tokens
        lengths.clear()
        first = sim.simulate(SEQUENCES)
        second = sim.simulate(SEQUENCES)
    finally:
        handle.remove()
    # 3 batches per call, each one main pass + one chain pass; nothing re-reads the prefix.
    assert len(lengths) == 2 * 2 * 3
    assert all(shape[1] < sim.prefix_tokens for shape in lengths)
    seq_tokens = sum(len(tokenizer(s, add_special_tokens=False)["input_ids"]) for q in SEQUENCES for s in q)
    segments = sum(len(q) for q in SEQUENCES)
    assert sim.tokens_processed == sim.prefix_tokens + 2 * (seq_tokens + segments)
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a, b)


def test_empty_sequence_and_segment(tiny):
    model, tokenizer = tiny("gpt2")
    sim = LocalSimulator(model, tokenizer, PREFIX)
    out = sim.simulate([[], make_sequence(2)])
    assert out[0].shape == (0, 11) and out[1].shape == (2, 11)
    with pytest.raises(ValueError, match="no tokens"):
        sim.simulate([["the\t", ""]])


def test_too_long_prompt_is_refused(tiny):
    model, tokenizer = tiny("gpt2")  # 256 positions
    with pytest.raises(ValueError, match="exceeds the simulator's context"):
        LocalSimulator(model, tokenizer, PREFIX).simulate([make_sequence(200)])


def _tokenizer_object(tok: Tokenizer) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")


def test_tokenizer_that_cannot_write_values_is_refused():
    # Llama-2 style: a space marker prepended, so "0" is ["▁", "0"].
    vocab = {"<unk>": 0, "▁": 1, **{str(d): 2 + d for d in range(10)}}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.normalizer = normalizers.Prepend("▁")
    with pytest.raises(ValueError, match=r"cannot express values 0-10.*'0'->\['▁', '0'\]"):
        value_token_ids(_tokenizer_object(tok))
    # No digits in the vocabulary: every digit is the same unknown token.
    tok = Tokenizer(models.WordLevel(vocab={"<unk>": 0, "the": 1}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    with pytest.raises(ValueError, match="cannot express values 0-10"):
        value_token_ids(_tokenizer_object(tok))


# ----------------------------------------------------------------------------- generation

CONVERSATIONS = [
    [{"role": "system", "content": "You explain neurons."}, {"role": "user", "content": "the\t10\nclass\t0"}],
    [{"role": "user", "content": "for"}],
    [{"role": "user", "content": "while the loop is running break out of it"}],
]


def test_chat_text_fallback_and_template(tiny):
    _, tokenizer = tiny("gpt2")
    assert chat_text(tokenizer, CONVERSATIONS[0]) == (
        "System: You explain neurons.\n\nUser: the\t10\nclass\t0\n\nAssistant:"
    )
    prefill = CONVERSATIONS[1] + [{"role": "assistant", "content": "the main thing"}]
    assert chat_text(tokenizer, prefill).endswith("Assistant: the main thing")
    tokenizer.chat_template = (
        "{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    try:
        assert chat_text(tokenizer, CONVERSATIONS[1]) == "<user>for\n<assistant>"
    finally:
        tokenizer.chat_template = None


def manual_greedy(model, tokenizer, conversation, steps: int, eos: set[int]) -> list[int]:
    ids = tokenizer(chat_text(tokenizer, conversation))["input_ids"]
    new = []
    with torch.no_grad():
        for _ in range(steps):
            token = int(model(torch.tensor([ids + new])).logits[0, -1].argmax())
            new.append(token)
            if token in eos:
                break
    return new


def test_greedy_equals_manual_argmax_and_batching(tiny):
    model, tokenizer = tiny("llama")
    batched = generate_texts(model, tokenizer, CONVERSATIONS, max_new_tokens=6, temperature=0, batch_size=3)
    single = generate_texts(model, tokenizer, CONVERSATIONS, max_new_tokens=6, temperature=0, batch_size=1)
    assert batched == single
    for conversation, result in zip(CONVERSATIONS, batched):
        new = manual_greedy(model, tokenizer, conversation, 6, {tokenizer.eos_token_id})
        assert result.text == tokenizer.decode(new, skip_special_tokens=True)
        assert result.usage.tokens_out == len(new)
        assert result.usage.tokens_in == len(tokenizer(chat_text(tokenizer, conversation))["input_ids"])
    assert tokenizer.pad_token is None  # padding did not change the tokenizer


def test_generation_stops_at_eos_and_counts_it(tiny):
    model, tokenizer = tiny("gpt2")
    conversation = CONVERSATIONS[2]
    free = manual_greedy(model, tokenizer, conversation, 8, set())
    stop = free[3]  # declare the 4th greedy token an end-of-sequence token of the model
    original = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = [original, stop]
    try:
        (result,) = generate_texts(model, tokenizer, [conversation], max_new_tokens=8, temperature=0)
    finally:
        model.generation_config.eos_token_id = original
    n = free.index(stop) + 1
    assert result.usage.tokens_out == n
    assert result.text == tokenizer.decode(free[:n], skip_special_tokens=True)
