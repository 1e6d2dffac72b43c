"""The known-neuron subject model (`tiny_models.build_token_neuron_model`) and the rule-based oracle
LLM (`oracle_server.OracleServer`), driven through the real `openai` client with the real prompt
builders of `neuron_assets.method`."""

import json
from pathlib import Path

import numpy as np
import openai
import pytest
import torch
from oracle_server import OracleServer, record_values
from pipeline import write_corpus
from tiny_models import (
    build_token_neuron_model,
    build_tokenizer,
    frequent_words,
    word_fires,
)
from transformers import AutoModelForCausalLM, AutoTokenizer

from neuron_assets.method import detection, prompts, remote
from neuron_assets.resources.corpus import python_docs, token_windows
from neuron_assets.resources.models import neuron_module
from neuron_assets.resources.openai_client import OpenAIEndpoint

PROMPTS = Path(__file__).resolve().parents[1] / "resources" / "prompts"
SEQ_LEN, MAX_WINDOWS = 16, 120  # as tests/pipeline.py:tiny_settings cuts the corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus") / "corpus.jsonl")


@pytest.fixture(scope="module")
def words(tmp_path_factory, corpus):
    tokenizer_dir = tmp_path_factory.mktemp("tokenizer")
    build_tokenizer(tokenizer_dir)
    return frequent_words(tokenizer_dir, corpus, SEQ_LEN, MAX_WINDOWS, n=3)


@pytest.fixture(scope="module")
def subject(tmp_path_factory, words):
    """(model, tokenizer, {neuron: word}); neuron 3 fires on words[2] and, half as much, words[0]."""
    path, neurons = build_token_neuron_model(tmp_path_factory.mktemp("subject"), [*words, f"{words[2]}|{words[0]}"])
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    return model, AutoTokenizer.from_pretrained(path), neurons


def activations(model, token_ids) -> np.ndarray:
    """[B, T, N] layer-0 MLP activations, read where the pipeline reads them."""
    captured = {}
    hook = neuron_module(model, 0).register_forward_pre_hook(lambda m, args: captured.setdefault("a", args[0]))
    try:
        with torch.no_grad():
            model(input_ids=torch.tensor(np.stack(token_ids), dtype=torch.long))
    finally:
        hook.remove()
    return captured["a"].float().numpy()


@pytest.fixture(scope="module")
def windows(subject, corpus):
    """(tokens per window, activations [W, T, N]) over the pipeline's windows of the test corpus."""
    model, tokenizer, _ = subject
    documents = [(str(i), json.loads(line)["text"]) for i, line in enumerate(corpus.read_text().splitlines())]
    cut = token_windows(tokenizer, documents, SEQ_LEN, MAX_WINDOWS)
    return cut["tokens"], activations(model, cut["token_ids"])


@pytest.fixture(scope="module")
def server():
    with OracleServer(api_key="sk-test") as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url, api_key="sk-test", max_retries=0, timeout=30)


def ask(client, messages) -> str:
    response = client.chat.completions.create(model="oracle", messages=messages, temperature=0)
    assert response.usage.prompt_tokens > 0 and response.usage.completion_tokens > 0
    return response.choices[0].message.content


def top_records(windows, neuron: int, n: int = 5):
    tokens, acts = windows
    order = np.argsort(-acts[:, :, neuron].max(axis=1), kind="stable")[:n]
    return [(tokens[i], acts[i, :, neuron]) for i in order]


def simulate(client, explanation: str, tokens_list) -> list[np.ndarray]:
    fewshot = prompts.load_fewshot(PROMPTS / "simulator_fewshot.json")
    out = []
    for tokens in tokens_list:
        content = ask(client, remote.json_simulation_messages(explanation, list(tokens), fewshot))
        values, failed, error = remote.read_json_simulation(content, list(tokens))
        assert error is None and not failed.any()
        out.append(values)
    return out


# --- the subject model ---------------------------------------------------------------------------


def test_frequent_words_are_single_tokens_in_enough_windows(words, windows):
    tokens, _ = windows
    assert len(words) == 3 and len(set(words)) == 3
    for word in words:
        assert word.startswith(" ") and word[1:].isalpha()
        n = sum(any(word_fires(w, word)) for w in tokens)
        assert 20 <= n <= 0.6 * len(tokens), (word, n)


def test_token_neurons_fire_exactly_on_their_words(subject):
    """On real text in 64-token windows (longer than the pipeline's, other positions and contexts)."""
    model, tokenizer, neurons = subject
    cut = token_windows(tokenizer, python_docs()[:80], 64, 60)
    acts = activations(model, cut["token_ids"])
    for neuron, spec in neurons.items():
        a = acts[:, :, neuron]
        parts = spec.split("|")
        masks = [np.array([word_fires(t, p) for t in cut["tokens"]]) for p in parts]
        assert all(m.sum() >= 20 for m in masks)
        assert a[masks[0]].min() > 3.0, (spec, a[masks[0]].min())
        if len(parts) == 2:  # the second word: about half as strong
            ratio = a[masks[1]] / a[masks[0]].mean()
            assert 0.35 < ratio.min() and ratio.max() < 0.65, (spec, ratio.min(), ratio.max())
        off = ~np.any(masks, axis=0)
        assert np.abs(a[off]).max() < 0.2, (spec, np.abs(a[off]).max())
        # off the word the pre-activation is exactly -bias whatever the context (gelu(-2) = -0.0455)
        assert np.allclose(a[off], -0.0455, atol=1e-3), (spec, a[off].min(), a[off].max())
    # the other neurons keep random weights: not silent like the built ones
    assert np.abs(acts[:, :, len(neurons):]).max() > 1.0


def test_a_word_of_several_tokens_is_refused(tmp_path):
    with pytest.raises(AssertionError, match="not one"):
        build_token_neuron_model(tmp_path, [" the", " zyxwvut"])


# --- the oracle through the openai client --------------------------------------------------------


def test_models_chat_only_and_unknown_requests(server, client):
    assert [m.id for m in client.models.list()] == ["oracle"]
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="oracle", prompt="hi", max_tokens=1)
    with pytest.raises(openai.BadRequestError, match="logprobs"):
        client.chat.completions.create(
            model="oracle", messages=[{"role": "user", "content": "Reply with the digit 0."}], logprobs=True
        )
    with pytest.raises(openai.BadRequestError, match="unknown request.*pirate"):
        ask(client, [{"role": "system", "content": "You are a pirate."}, {"role": "user", "content": "Ahoy"}])
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.base_url, api_key="sk-wrong", max_retries=0).models.list()
    assert ("/v1/models", None) in server.requests


def test_the_project_client_probes_json(server, tmp_path):
    endpoint = OpenAIEndpoint(server.base_url, "sk-test", "oracle", max_retries=0, timeout_s=30)
    assert endpoint.probe() == "json"


def test_explainer_names_the_top_token(subject, windows, client):
    _, _, neurons = subject
    fewshot = prompts.load_fewshot(PROMPTS / "explainer_fewshot.json")
    for neuron, spec in neurons.items():
        messages = prompts.explainer_messages(top_records(windows, neuron), fewshot)
        answer = prompts.clean_explanation(ask(client, messages))
        assert answer == f"the token {json.dumps(spec.split('|')[0].strip())}", (neuron, answer)


def _examples(windows, neuron, kind_fn, **kwargs):
    _, acts = windows
    peak = float(acts[:, :, neuron].max())
    ranked = np.argsort(-acts[:, :, neuron].max(axis=1), kind="stable")
    positives = [(int(i), acts[i, :, neuron]) for i in ranked[:20]]
    rest = [(int(i), acts[i, :, neuron]) for i in np.random.default_rng(neuron).permutation(ranked[20:])]
    # random records as the pipeline samples them (activating ones are dropped by kind_fn)
    return kind_fn(positives, rest[:40], rest[40:80], peak, **kwargs)


def _judge(client, windows, explanation, examples):
    tokens, _ = windows
    by_id = dict(enumerate(tokens))
    predictions = [None] * len(examples)
    index = {id(e): k for k, e in enumerate(examples)}
    for batch in detection.batches(examples, size=10, seed=0):
        values, error = detection.read_answer(ask(client, detection.batch_messages(explanation, batch, by_id)), len(batch))
        assert error is None
        for example, value in zip(batch, values):
            predictions[index[id(example)]] = value
    return detection.scores_from_answers(examples, predictions), predictions


def test_detection_judge(subject, windows, client):
    _, _, neurons = subject
    for neuron in range(3):
        word = neurons[neuron].strip()
        examples = _examples(windows, neuron, detection.detection_examples)
        scores, _ = _judge(client, windows, f'the token "{word}"', examples)
        assert scores["n_positive"] == 20 and scores["n_random"] >= 10
        assert scores["all"] >= 0.9, (word, scores)
        wrong = neurons[(neuron + 1) % 3].strip()
        scores, _ = _judge(client, windows, f'the token "{wrong}"', examples)
        assert scores["all"] < 0.75, (word, wrong, scores)
    # whole words only, after undoing the \n and \t escapes of the excerpt text
    messages = detection.detection_messages(
        'the token "the"', [["A", " theory", "."], ["x", "\n", "the", " end"], ["the", "\t", "x"], [" other"]]
    )
    assert json.loads(ask(client, messages)) == [0, 1, 1, 0]


def test_fuzzing_judge(subject, windows, client):
    _, _, neurons = subject
    tokens, _ = windows
    by_id = dict(enumerate(tokens))
    for neuron in range(3):
        word = neurons[neuron].strip()
        examples = _examples(windows, neuron, detection.fuzzing_examples, tokens=by_id, top_tokens={word})
        scores, predictions = _judge(client, windows, f'the token "{word}"', examples)
        assert scores["n_positive"] == 20
        assert scores["all"] >= 0.95, (word, scores)
        assert all(p == 1 for e, p in zip(examples, predictions) if e["kind"] == "positive")
    messages = detection.fuzzing_messages(
        'the tokens "the" and "is"',
        [([" the", " cat", " is"], [True, False, True]), ([" the", " cat"], [True, True]),
         ([" the", " cat"], [False, False]), ([" is", " \\"], [True, False])],
    )
    assert json.loads(ask(client, messages)) == [1, 0, 0, 1]


def test_record_lines_are_unescaped():
    text = prompts.format_record(["a\tb", " x\\n", "\n", "end"], [3, 1, 0, "unknown"])
    assert record_values(text) == [("a\tb", 3), (" x\\n", 1), ("\n", 0)]
