"""The judge of the detection and fuzzing scorers, for real: a tiny model in this process deciding
from its logits (resources/local_judge.py), and a remote judge over loopback HTTP whose answers
carry logprobs, or whose endpoint rejects them."""

import json
import math

import polars as pl
import pytest
import torch
from openai_server import FakeOpenAIServer
from test_stage_detect import TOKENS, explained, records
from tiny_models import build_tiny_model
from tokenizers import Tokenizer, models
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from neuron_assets.method.detection import detection_messages
from neuron_assets.resources.llm import LLM
from neuron_assets.resources.local_judge import OPENING, SEPARATOR, digit_token_ids, judge_conversations
from neuron_assets.resources.local_llm import chat_text
from neuron_assets.resources.models import load_causal_lm
from neuron_assets.stages.detect import ACCURACIES, AUROCS, SCHEMA, judge_units

SEED = 7
ROWS = explained((3, "llm", "the word cat", None), (4, "llm", "dogs", None))
RECORDS = {3: records(), 4: records(peak=3.0)}


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return build_tiny_model("llama", tmp_path_factory.mktemp("judge"), n_layers=1, max_positions=2048)


def forwards(llm: LLM) -> list[int]:
    """A counter of the model's forward passes (one item, incremented)."""
    count = [0]
    lm, _ = load_causal_lm(llm.model, llm.cache, llm.device)
    lm.register_forward_pre_hook(lambda module, args: count.__setitem__(0, count[0] + 1))
    return count


def judged(llm: LLM) -> pl.DataFrame:
    result = judge_units(ROWS, RECORDS, TOKENS, llm, SEED, "c1", report=lambda _: None)
    return pl.DataFrame(result.rows, schema=SCHEMA).sort("unit")


def test_the_local_judge_decides_every_excerpt_deterministically_and_from_the_cache_on_a_rerun(llama, tmp_path):
    llm = LLM(backend="local", model=str(llama), device="cpu", cache=str(tmp_path / "models"),
              response_cache=str(tmp_path / "llm_cache"), batch_size=2)
    count = forwards(llm)
    first = judged(llm)
    assert count[0] > 0
    assert first["error"].is_null().all() and (first["judge_method"] == "logits").all()
    assert (first["n_unanswered"] == 0).all() and (first["n_positive"] == 10).all()
    for row in first.iter_rows(named=True):  # both classes in every column: every accuracy and AUROC is a number
        assert all(0 <= row[column] <= 1 for column in [*ACCURACIES, *AUROCS]), row
    # one cache entry per batch: 2 explanations x 2 scorers x 3 batches
    entries = [json.loads(p.read_text()) for p in (tmp_path / "llm_cache").rglob("*.json")]
    assert len(entries) == 12 and {e["task"] for e in entries} == {"judge"}
    assert all(len(e["response"]["p_one"]) == e["size"] for e in entries)

    # a rerun, by another resource: every verdict from the cache, no model call, the same rows
    calls = count[0]
    again = judged(LLM(**llm.model_dump()))
    assert count[0] == calls and again.equals(first)
    # without the cache the model is asked again, and decides the same
    fresh = judged(LLM(**{**llm.model_dump(), "response_cache": None}))
    assert count[0] > calls and fresh.equals(first)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])  # gpt2 (no grouped heads) reads rows together on a CPU
def test_the_cached_steps_give_what_a_full_pass_per_value_gives(arch, tmp_path):
    path = build_tiny_model(arch, tmp_path, n_layers=1, max_positions=1024)
    model, tokenizer = AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)
    sizes = [10, 3, 7, 10, 1]
    conversations = [detection_messages("cats", [["a", " cat", " sat"][: 1 + i % 3] * (i + 1)] * n)
                     for i, n in enumerate(sizes)]
    judgements = judge_conversations(model, tokenizer, conversations[:4], sizes[:4], batch_size=4)
    # a batch of one excerpt, alone: a list of a single value
    judgements += judge_conversations(model, tokenizer, conversations[4:], sizes[4:], batch_size=4)
    zero, one = digit_token_ids(tokenizer)
    for conversation, n, judgement in zip(conversations, sizes, judgements):
        ids = tokenizer(chat_text(tokenizer, conversation))["input_ids"] + tokenizer(OPENING, add_special_tokens=False)["input_ids"]
        expected = []
        for _ in range(n):  # the whole prompt and answer so far again for each value, no cache
            with torch.inference_mode():
                logits = model(input_ids=torch.tensor([ids])).logits[0, -1, [zero, one]].double()
            expected.append(float(torch.softmax(logits, dim=-1)[1]))
            ids += [one if expected[-1] > 0.5 else zero] + tokenizer(SEPARATOR, add_special_tokens=False)["input_ids"]
        assert judgement.p_one == pytest.approx(expected, abs=1e-5)
        assert judgement.decisions == [int(p > 0.5) for p in expected] and len(judgement.decisions) == n


def test_a_tokenizer_without_single_digit_tokens_is_named():
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<unk>": 0, "cat": 1}, "<unk>")),
                                        unk_token="<unk>")
    with pytest.raises(ValueError, match="must write '0' and '1' as one token each"):
        digit_token_ids(tokenizer)


class ScriptedJudge(FakeOpenAIServer):
    """An endpoint that answers a judge's conversation of n excerpts with `answers[n]`, one character
    per token; asked for logprobs, it gives each digit "1" at p("1") = 0.9 and "0" at p("1") = 0.2."""

    def __init__(self, answers: dict[int, str]):
        super().__init__()
        self.answers = answers

    def _chat(self, body: dict) -> dict:
        text = self.answers[body["messages"][-1]["content"].count("Excerpt ")]

        def entry(token, p_one=None):
            alternatives = [{"token": token, "logprob": 0.0}] if p_one is None else \
                [{"token": "1", "logprob": math.log(p_one)}, {"token": "0", "logprob": math.log(1 - p_one)}]
            return {"token": token, "logprob": alternatives[0]["logprob"], "top_logprobs": alternatives}

        content = [entry(c, {"1": 0.9, "0": 0.2}.get(c)) for c in text]
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop",
                  "logprobs": {"content": content} if body.get("logprobs") else None}
        return self._envelope("chatcmpl", "chat.completion", [choice], 10, len(text))


def remote(server: FakeOpenAIServer) -> LLM:
    return LLM(backend="openai", model=server.model_name, base_url=server.base_url, api_key="sk-test")


def test_the_remote_judge_reads_the_list_and_its_probabilities_and_leaves_an_unreadable_answer_unanswered():
    conversations = [detection_messages("cats", [["a", " cat"]] * n) for n in (3, 2, 1)]
    with ScriptedJudge({3: "Sure: [1, 0, 1]", 2: "[1, 0] and more", 1: "I think it does."}) as server:
        verdicts = remote(server).judge(conversations, [3, 2, 1], seed=SEED)
        posts = server.posts("/chat/completions")
    assert all(p["logprobs"] is True and p["temperature"] == 0 and p["seed"] == SEED for p in posts)
    assert [v.decisions for v in verdicts] == [[1, 0, 1], [1, 0], [None]]
    assert verdicts[0].p_one == pytest.approx([0.9, 0.2, 0.9]) and verdicts[1].p_one == pytest.approx([0.9, 0.2])
    assert verdicts[2].p_one == [None] and verdicts[2].error is None
    assert verdicts[2].unreadable.startswith("expected a JSON list of 1 values 0 or 1")


def test_an_endpoint_without_logprobs_still_judges_by_text_and_unreadable_answers_are_counted():
    # the tiny random model writes no list: every excerpt is unanswered, counted, and no row fails
    with FakeOpenAIServer(chat_logprobs=False) as server:
        llm = remote(server)
        result = judge_units(ROWS[:1], RECORDS, TOKENS, llm, SEED, "c1", report=lambda _: None)
        posts = server.posts("/chat/completions")
    (row,) = result.rows
    assert row["error"] is None and row["judge_method"] == "text" and row["n_unanswered"] == 2 * 25
    assert math.isnan(row["detection"]) and math.isnan(row["detection_auroc"]) and len(result.unreadable) == 6
    # each batch asked as text once; with logprobs (rejected) only those sent before the first rejection
    with_logprobs = [p for p in posts if p.get("logprobs")]
    assert len(posts) - len(with_logprobs) == 6 and 1 <= len(with_logprobs) <= 3
