"""Explainer generation (`generate_texts`) against a plain reference on tiny random models.

The reference is the definition computed the slow way: one conversation at a time, the whole
prompt through the model at every step (no cache, no batching), greedy, stopping at EOS or at the
end of the answer's first non-empty line.
"""

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from neuron_assets.method.prompts import EXPLANATION_PREFIX, format_record
from neuron_assets.resources import local_llm
from neuron_assets.resources.local_llm import chat_text, generate_texts
from tiny_models import build_tiny_model

WORDS = "for each item in the list while the loop is running break out of it if the value class def".split()
# The shape of an explainer conversation (explainer_messages with prefill), kept short: an
# instruction and few-shot turns shared by every neuron, the target's records, the answer's start.
FEWSHOT = [
    {"role": "system", "content": "Explain the neuron."},
    {"role": "user", "content": "Neuron 1\n" + format_record(["for", " x", " in", " y"], [8, 0, 3, 0])},
    {"role": "assistant", "content": f"{EXPLANATION_PREFIX} loop keywords."},
    {"role": "user", "content": "Neuron 2\n" + format_record(["class", " A", ":"], [7, 2, 0])},
    {"role": "assistant", "content": f"{EXPLANATION_PREFIX} class definitions."},
]
MAX_NEW = 8


def conversation(n: int, offset: int, fewshot: list[dict] = FEWSHOT) -> list[dict]:
    """The target neuron: one record of n tokens, so every conversation has its own length."""
    tokens = [f" {WORDS[(offset + i) % len(WORDS)]}" for i in range(n)]
    values = [(offset + i) % 4 * ((offset + i) % 3) for i in range(n)]
    return fewshot + [{"role": "user", "content": "Neuron 3\n" + format_record(tokens, values)},
                      {"role": "assistant", "content": EXPLANATION_PREFIX}]


CONVERSATIONS = [conversation(n, offset) for n, offset in [(6, 0), (15, 3), (2, 7), (10, 2), (4, 9)]]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from threads; on a busy machine, waiting threads slow them down many times."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def short_chunks(monkeypatch):
    """Prompts here are short: small prefill chunks make them run in several chunks, as real ones do."""
    monkeypatch.setattr(local_llm, "PREFILL_CHUNK", 16)


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    """A saved tiny model per architecture, built on first use; long enough for the prompts."""
    built = {}

    def get(arch: str):
        if arch not in built:
            built[arch] = build_tiny_model(arch, tmp_path_factory.mktemp(arch), max_positions=1024)
        return built[arch]

    return get


def fresh(path, attn_implementation: str = "sdpa"):
    """A newly loaded model object: nothing from earlier calls is stored for it."""
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation=attn_implementation).eval()
    return model, AutoTokenizer.from_pretrained(path)


def prompt_ids(tokenizer, conversation) -> list[int]:
    return tokenizer(chat_text(tokenizer, conversation))["input_ids"]


def first_line_done(tokenizer, new: list[int]) -> bool:
    return "\n" in tokenizer.decode(new, skip_special_tokens=True).lstrip()


def plain_greedy(model, tokenizer, conversation, max_new: int, stop_at_line: bool = True) -> list[int]:
    ids, new = prompt_ids(tokenizer, conversation), []
    with torch.no_grad():
        while len(new) < max_new:
            token = int(model(torch.tensor([ids + new])).logits[0, -1].argmax())
            new.append(token)
            if token == tokenizer.eos_token_id or (stop_at_line and first_line_done(tokenizer, new)):
                break
    return new


def common_prefix(rows: list[list[int]]) -> int:
    """The longest common prefix, short of every row's last token."""
    n = 0
    while all(len(r) > n + 1 for r in rows) and len({r[n] for r in rows}) == 1:
        n += 1
    return n


@pytest.fixture(scope="module")
def reference(model_dirs):
    """The plain greedy answers to CONVERSATIONS per (architecture, attention), computed once."""
    answers = {}

    def get(arch: str, attn_implementation: str = "sdpa") -> list[list[int]]:
        if (arch, attn_implementation) not in answers:
            model, tokenizer = fresh(model_dirs(arch), attn_implementation)
            answers[arch, attn_implementation] = [plain_greedy(model, tokenizer, c, MAX_NEW) for c in CONVERSATIONS]
        return answers[arch, attn_implementation]

    return get


@pytest.fixture(params=[True, False], ids=["rows-together", "row-by-row"])
def decode_together(request, monkeypatch):
    """Both decode strategies on every architecture (on a CPU the choice depends on the attention)."""
    monkeypatch.setattr(local_llm, "_decodes_rows_together", lambda model: request.param)
    return request.param


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gpt_neox"])
def test_greedy_equals_plain_reference(model_dirs, reference, arch, decode_together):
    model, tokenizer = fresh(model_dirs(arch))
    want = reference(arch)
    texts = [tokenizer.decode(w, skip_special_tokens=True) for w in want]
    # The comparison has teeth: the answers differ and most run for several tokens.
    assert len(set(texts)) >= 3 and sum(len(w) > 2 for w in want) >= 3
    for batch_size in (2, 5):  # three batches (one of them a single row), then one batch
        got = generate_texts(model, tokenizer, CONVERSATIONS, max_new_tokens=MAX_NEW, temperature=0,
                             batch_size=batch_size)
        assert [g.text for g in got] == texts
        assert [g.usage.tokens_out for g in got] == [len(w) for w in want]
        assert [g.usage.tokens_in for g in got] == [len(prompt_ids(tokenizer, c)) for c in CONVERSATIONS]


def test_eager_attention_equals_plain_reference(model_dirs, reference, decode_together):
    model, tokenizer = fresh(model_dirs("llama"), attn_implementation="eager")
    got = generate_texts(model, tokenizer, CONVERSATIONS, max_new_tokens=MAX_NEW, temperature=0, batch_size=5)
    assert [g.text for g in got] == [tokenizer.decode(w, skip_special_tokens=True)
                                        for w in reference("llama", "eager")]


def test_shared_prefix_is_computed_once(model_dirs):
    """The first call computes the common prefix once and each prompt's own tokens once; a later
    call with the same few-shot part computes only its prompts' own tokens."""
    model, tokenizer = fresh(model_dirs("llama"))
    prompts = [prompt_ids(tokenizer, c) for c in CONVERSATIONS]
    first, later = prompts[:3], prompts[3:]
    shared = common_prefix(prompts)
    # The conversations part right after the few-shot turns, which dominate the prompts.
    assert common_prefix(first) == common_prefix(later) == shared > 0.5 * max(map(len, prompts))
    fed = []
    handle = model.register_forward_hook(lambda mod, args, kwargs, out: fed.append(kwargs["input_ids"].shape),
                                         with_kwargs=True)
    try:
        first_results = generate_texts(model, tokenizer, CONVERSATIONS[:3], max_new_tokens=MAX_NEW, temperature=0)
        first_fed = sum(rows * q for rows, q in fed)
        fed.clear()
        later_results = generate_texts(model, tokenizer, CONVERSATIONS[3:], max_new_tokens=MAX_NEW, temperature=0)
        later_fed = sum(rows * q for rows, q in fed)
    finally:
        handle.remove()
    own = lambda rows: sum(len(p) - shared for p in rows)
    fed_back = lambda results: sum(r.usage.tokens_out - 1 for r in results)  # all but each answer's last token
    assert first_fed == shared + own(first) + fed_back(first_results)
    assert later_fed == own(later) + fed_back(later_results)


def test_results_do_not_depend_on_earlier_calls(model_dirs):
    """Whatever an earlier call left stored (a longer prefix, another few-shot part), the answers
    are those of the plain reference."""
    model, tokenizer = fresh(model_dirs("gpt_neox"))
    other = [conversation(5, 1, FEWSHOT[:1] + FEWSHOT[3:])]
    calls = [CONVERSATIONS[1:2], CONVERSATIONS, other, CONVERSATIONS[2:4], other + CONVERSATIONS[:2]]
    for conversations in calls:
        got = generate_texts(model, tokenizer, conversations, max_new_tokens=MAX_NEW, temperature=0, batch_size=3)
        want = [tokenizer.decode(plain_greedy(model, tokenizer, c, MAX_NEW), skip_special_tokens=True)
                for c in conversations]
        assert [g.text for g in got] == want


def test_generation_stops_at_the_end_of_the_first_line(model_dirs):
    """An answer that goes on after its first line is cut right after that line's newline."""
    model, tokenizer = fresh(model_dirs("llama"))
    (newline,) = tokenizer("\n", add_special_tokens=False)["input_ids"]
    free = plain_greedy(model, tokenizer, CONVERSATIONS[0], MAX_NEW, stop_at_line=False)
    # The tiny model writes no newline by itself: make its greedy token k one, by swapping that
    # token's output row with the newline's (logits at steps before k keep their argmax).
    k = next(k for k in range(1, MAX_NEW - 2) if tokenizer.decode(free[:k]).strip()
             and newline not in free[: k + 1] and free[k] not in free[:k])
    with torch.no_grad():
        model.lm_head.weight[[free[k], newline]] = model.lm_head.weight[[newline, free[k]]]
    free = plain_greedy(model, tokenizer, CONVERSATIONS[0], MAX_NEW, stop_at_line=False)
    assert free[k] == newline and len(free) > k + 1  # the answer would go on after its first line
    (result,) = generate_texts(model, tokenizer, CONVERSATIONS[:1], max_new_tokens=MAX_NEW, temperature=0)
    assert result.usage.tokens_out == k + 1
    assert result.text == tokenizer.decode(free[: k + 1], skip_special_tokens=True)
    assert result.text.endswith("\n") and result.text.strip()


@pytest.mark.parametrize("text, done", [
    ("the word class", False),
    ("\n\n the word", False),  # a leading blank line is not the end of the first line
    ("\n the word class.\n", True),
    ("loops.\nNeuron 5", True),
])
def test_first_line_end_rule(model_dirs, text, done):
    _, tokenizer = fresh(model_dirs("gpt2"))
    new = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert local_llm._answer_complete(tokenizer, [tokenizer.eos_token_id], new) is done
    assert local_llm._answer_complete(tokenizer, [tokenizer.eos_token_id], new + [tokenizer.eos_token_id])


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_seeded_sampling_is_reproducible(model_dirs, arch, decode_together):
    model, tokenizer = fresh(model_dirs(arch))
    run = lambda seed, top_p=1.0: generate_texts(model, tokenizer, CONVERSATIONS, max_new_tokens=MAX_NEW,
                                                 seed=seed, top_p=top_p, batch_size=2)
    torch.manual_seed(123)
    a, b, c = run(0), run(0), run(1)
    after = torch.rand(1)
    assert a == b
    assert a != c
    torch.manual_seed(123)
    assert torch.equal(torch.rand(1), after)  # the caller's RNG stream is not disturbed
    assert run(0, top_p=0.5) == run(0, top_p=0.5)
    assert all(0 < r.usage.tokens_out <= MAX_NEW and r.usage.tokens_in > 0 for r in a)


def test_sampling_follows_temperature_and_top_p():
    logits = torch.log(torch.tensor([[0.55, 0.3, 0.1, 0.05]])).expand(20000, 4)
    torch.manual_seed(0)
    draw = lambda temperature, top_p: torch.bincount(local_llm._next_tokens(logits, temperature, top_p), minlength=4)
    np.testing.assert_allclose(draw(1.0, 1.0) / 20000, [0.55, 0.3, 0.1, 0.05], atol=0.015)
    # top_p 0.8: the nucleus is {0.55, 0.3} (0.55 alone falls short), renormalised.
    np.testing.assert_allclose(draw(1.0, 0.8) / 20000, [0.55 / 0.85, 0.3 / 0.85, 0, 0], atol=0.015)
    assert draw(1.0, 0.5).tolist() == [20000, 0, 0, 0]
    # temperature 0.5 squares the probabilities before renormalising.
    squared = np.array([0.55, 0.3, 0.1, 0.05]) ** 2
    np.testing.assert_allclose(draw(0.5, 1.0) / 20000, squared / squared.sum(), atol=0.015)
    assert local_llm._next_tokens(logits[:2], 0, 1.0).tolist() == [0, 0]
