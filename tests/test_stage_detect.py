"""The detect stage as plain code, without Dagster: its loop over explanations with a fake judge that
answers from the excerpts it is shown (the LLM interface of resources/llm.py, nothing else). The real
judges, local and remote, are in test_local_judge.py."""

import json
import math
import os
import re

import numpy as np
import polars as pl
import pytest

from neuron_assets.stages.detect import SCHEMA, judge_units
from neuron_assets.method.detection import read_answer
from neuron_assets.stages.results import Usage, Verdict
from neuron_assets.stages.seeds import unit_seed

SEED = 7
USAGE = Usage(tokens_in=10, tokens_out=2, cost_usd=0.001)
# window s: "w{s}" names it; top windows (0-19) fire on " cat", hard negatives (40-44) hold " cat" silently
TOKENS = {s: [f"w{s}", " the", " cat" if s < 20 or s >= 40 else " dog", "."] for s in range(50)}
FIRING = set(range(20))
# examples per scorer: the 10 valid + test top records, the first 10 of 15 random windows, 5 hard negatives
EXAMPLES = 10 + 10 + 5


def records(peak: float = 2.0, n_top: int = 20) -> dict:
    top = [(s, np.where(np.arange(4) == 2, peak * (1 - s / 40), 0.0).astype(np.float32)) for s in range(n_top)]
    return {"top": top, "random": [(s, np.zeros(4, np.float32)) for s in range(20, 35)],
            "hard_negative": [(s, np.zeros(4, np.float32)) for s in range(40, 45)]}


def explained(*rows: tuple[int, str, str | None, str | None]) -> pl.DataFrame:
    """Rows of explanation_variants: (neuron, variant, text, error) of layer 0."""
    return pl.DataFrame([{"layer": 0, "unit": n, "variant": v, "explanation_id": f"{v}{n}", "text": text,
                          "error": error} for n, v, text, error in rows])


def windows_shown(conversation: list[dict]) -> list[int]:
    """The seq_id of each excerpt of a judge's conversation, in order."""
    return [int(s) for s in re.findall(r"^Excerpt \d+: (?:<<)?w(\d+)", conversation[-1]["content"], re.M)]


def correct(conversation: list[dict]) -> str:
    return json.dumps([int(s in FIRING) for s in windows_shown(conversation)])


class FakeJudge:
    """An LLM as the stage uses it: `label`, `judge_method` and `judge`, one Verdict per conversation
    read, as a remote judge's, from the text `answer(conversation)`, with p("1") = 0.8 where it says 1
    and 0.3 where it says 0; it records each call's conversations and seed."""

    label, judge_method, concurrency = "fake judge", "text", 1

    def __init__(self, answer=correct):
        self.answer, self.calls = answer, []

    def judge(self, conversations, sizes, seed) -> list[Verdict]:
        assert len(sizes) == len(conversations)
        self.calls.append((conversations, seed))
        verdicts = []
        for conversation, n in zip(conversations, sizes):
            decisions, unreadable = read_answer(self.answer(conversation), n)
            p_one = [0.8 if d else 0.3 for d in decisions] if decisions else [None] * n
            verdicts.append(Verdict(decisions or [None] * n, p_one, USAGE, unreadable))
        return verdicts


def judge(rows: pl.DataFrame, recs: dict, judge_llm) -> dict:
    result = judge_units(rows, recs, TOKENS, judge_llm, SEED, "c1", report=lambda _: None)
    table = pl.DataFrame(result.rows, schema=SCHEMA)
    assert table.height == rows.height and result.model_seconds <= result.seconds
    return {(r["unit"], r["variant"]): r for r in table.iter_rows(named=True)}


def test_a_judge_that_answers_correctly_scores_1_on_every_kind():
    by = judge(explained((3, "llm", "the word cat", None)), {3: records()}, FakeJudge())
    row = by[3, "llm"]
    for scorer in ("detection", "fuzzing"):
        assert row[scorer] == row[f"{scorer}_random"] == row[f"{scorer}_hard_negative"] == 1.0
    assert (row["n_positive"], row["n_random"], row["n_hard_negative"], row["n_unanswered"]) == (10, 10, 5, 0)
    # 3 batches of at most 10 excerpts per scorer, each with its usage
    assert (row["tokens_in"], row["tokens_out"], row["cost_usd"]) == (60, 12, pytest.approx(0.006))
    assert row["error"] is None and row["judge_model"] == "fake judge" and row["code_version"] == "c1"
    assert row["judge_method"] == "text" and row["detection_auroc"] == row["fuzzing_auroc"] == 1.0


def test_a_judge_that_answers_the_opposite_scores_0():
    def opposite(conversation):
        return json.dumps([int(s not in FIRING) for s in windows_shown(conversation)])

    row = judge(explained((3, "llm", "the word cat", None)), {3: records()}, FakeJudge(opposite))[3, "llm"]
    assert row["detection"] == row["fuzzing_hard_negative"] == 0.0 and row["n_unanswered"] == 0
    assert row["detection_auroc"] == 0.0


def test_garbage_answers_are_counted_unanswered_with_nan_accuracies_never_0():
    row = judge(explained((3, "llm", "the word cat", None)), {3: records()}, FakeJudge(lambda c: "cats!"))[3, "llm"]
    assert all(math.isnan(row[c]) for c in ("detection", "detection_random", "detection_hard_negative",
                                            "fuzzing", "fuzzing_random", "fuzzing_hard_negative",
                                            "detection_auroc", "fuzzing_auroc"))
    assert (row["n_positive"], row["n_random"], row["n_hard_negative"]) == (0, 0, 0)
    assert row["n_unanswered"] == 2 * EXAMPLES
    assert row["error"] is None  # the judge answered, unreadably: counted, not a failure of the row
    assert row["cost_usd"] == pytest.approx(0.006)  # unanswered requests still cost
    result = judge_units(explained((3, "llm", "the word cat", None)), {3: records()}, TOKENS,
                         FakeJudge(lambda c: "cats!"), SEED, "c1", report=lambda _: None)
    assert len(result.unreadable) == 6 and result.unreadable[0].startswith("expected a JSON list of")

    # fuzzing unanswered only: detection keeps its scores
    def detection_only(conversation):
        return "no idea" if "<<" in conversation[-1]["content"] else correct(conversation)

    row = judge(explained((3, "llm", "the word cat", None)), {3: records()}, FakeJudge(detection_only))[3, "llm"]
    assert row["detection"] == 1.0 and math.isnan(row["fuzzing"]) and row["n_unanswered"] == EXAMPLES
    assert row["error"] is None


def test_a_failing_judge_or_a_missing_explanation_is_an_error_row():
    class Broken(FakeJudge):
        def judge(self, conversations, sizes, seed):
            raise RuntimeError("out of memory")

    rows = explained((3, "llm", "the word cat", None), (3, "token_baseline", None, "no token has a positive mean"),
                     (4, "llm", "the word cat", None))
    by = judge(rows, {3: records(), 4: records(n_top=7)}, Broken())
    assert by[3, "llm"]["error"].startswith("6 failed judge requests; first: detection: judge failed: RuntimeError")
    assert by[3, "llm"]["n_unanswered"] == 2 * EXAMPLES and math.isnan(by[3, "llm"]["detection"])
    assert by[3, "token_baseline"]["error"] == "no explanation: no token has a positive mean"
    assert by[4, "llm"]["error"].startswith("not enough records")
    for key in ((3, "token_baseline"), (4, "llm")):
        row = by[key]
        assert math.isnan(row["detection"]) and math.isnan(row["fuzzing_hard_negative"])
        assert (row["n_positive"], row["n_unanswered"], row["tokens_in"], row["cost_usd"]) == (0, 0, 0, 0.0)


def test_a_neurons_requests_do_not_depend_on_what_else_is_judged():
    recs = {3: records(), 4: records(peak=3.0)}
    both, alone = FakeJudge(), FakeJudge()
    judge(explained((3, "llm", "the word cat", None), (4, "llm", "the word cat", None)), recs, both)
    judge(explained((4, "llm", "the word cat", None)), recs, alone)
    # one call per batch of detection and of fuzzing; neuron 4's are those of judging it alone
    assert len(both.calls) == 2 * len(alone.calls) and both.calls[len(alone.calls):] == alone.calls
    calls = len(alone.calls)
    assert [seed for _, seed in both.calls] == [unit_seed(SEED, 0, 3)] * calls + [unit_seed(SEED, 0, 4)] * calls
    # the seeded order mixes positives and negatives: the first batch is not all positives
    assert set(windows_shown(alone.calls[0][0][0])) - FIRING


def test_every_explanation_of_a_neuron_is_asked_each_batch_in_one_call_sharing_the_excerpts():
    judge_llm = FakeJudge()
    rows = judge(explained((3, "llm", "the word cat", None), (3, "revised", "cats and kittens", None),
                           (3, "token_baseline", "the token ' cat'", None)), {3: records()}, judge_llm)
    assert {r["error"] for r in rows.values()} == {None}
    for conversations, _ in judge_llm.calls:
        assert len(conversations) == 3  # llm, revised, token_baseline of neuron 3
        users = [c[-1]["content"] for c in conversations]
        shared = os.path.commonprefix(users)
        # the prompts differ from the explanation on: every excerpt is in their common prefix
        assert shared.count("Excerpt ") == users[0].count("Excerpt ") > 0
        assert "the word cat" not in shared
