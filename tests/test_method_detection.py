import math

import numpy as np
import pytest

from neuron_assets.method.detection import (
    BATCH_SIZE,
    answer_probabilities,
    DETECTION_INSTRUCTION,
    FUZZING_INSTRUCTION,
    HIGHLIGHT_CLOSE,
    HIGHLIGHT_OPEN,
    balanced_accuracy,
    batch_messages,
    batches,
    detection_examples,
    detection_messages,
    excerpt_text,
    fuzzing_examples,
    fuzzing_messages,
    read_answer,
    scores_from_answers,
    top_token_texts,
)

EXPLANATION_LINE = "Neuron behavior: the main thing this neuron does is find dates in letters."


def _lines(messages: list[dict]) -> list[str]:
    return messages[1]["content"].split("\n")


def test_constants():
    assert (HIGHLIGHT_OPEN, HIGHLIGHT_CLOSE, BATCH_SIZE) == ("<<", ">>", 10)
    assert DETECTION_INSTRUCTION != FUZZING_INSTRUCTION


def test_detection_message_format():
    excerpts = [["Dear", " Sir", ",\n", "on", "\t", "May", " 5"], ["<script>", "alert", "</script>"],
                ["I", " ❤️", " 🐍"]]
    messages = detection_messages("dates in letters", excerpts)
    assert [m["role"] for m in messages] == ["system", "user"]
    assert messages[0]["content"] == DETECTION_INSTRUCTION
    lines = _lines(messages)
    assert EXPLANATION_LINE in lines
    excerpt_lines = [line for line in lines if line.startswith("Excerpt ")]
    assert excerpt_lines == [
        "Excerpt 1: Dear Sir,\\non\\tMay 5",
        "Excerpt 2: <script>alert</script>",
        "Excerpt 3: I ❤️ 🐍",
    ]
    # the excerpts first: every explanation of a neuron shares them as a prompt prefix
    assert lines.index(excerpt_lines[-1]) < lines.index(EXPLANATION_LINE)
    closing = lines[-1]
    assert "JSON list of 3 integers" in closing and "0 or 1" in closing
    assert lines.index(excerpt_lines[-1]) < len(lines) - 1
    assert "&lt;" not in messages[1]["content"]


def test_fuzzing_message_merges_highlight_runs():
    tokens = ["a", " b", " c", " d", "\n", " e"]
    highlight = [False, True, True, False, True, True]
    assert excerpt_text(tokens, highlight) == "a<< b c>> d<<\\n e>>"
    assert excerpt_text(["x", "y"], [True, False]) == "<<x>>y"
    assert excerpt_text(["x", "y"], [True, True]) == "<<xy>>"
    assert excerpt_text(["x", "y"], [False, False]) == "xy"
    messages = fuzzing_messages("dates in letters", [(tokens, highlight), (["<b>", "🙂"], [False, True])])
    assert messages[0] == {"role": "system", "content": FUZZING_INSTRUCTION}
    lines = _lines(messages)
    assert EXPLANATION_LINE in lines
    assert [line for line in lines if line.startswith("Excerpt ")] == [
        "Excerpt 1: a<< b c>> d<<\\n e>>",
        "Excerpt 2: <b><<🙂>>",
    ]
    assert "JSON list of 2 integers" in lines[-1] and "highlighted" in lines[-1]
    with pytest.raises(ValueError):
        excerpt_text(["x"], [True, False])


def test_batch_messages_picks_scorer():
    tokens = {7: ["a", "b"], 9: ["c"]}
    detection = batch_messages("x", [{"kind": "positive", "seq_id": 7, "label": 1}], tokens)
    assert detection[0]["content"] == DETECTION_INSTRUCTION
    assert "Excerpt 1: ab" in _lines(detection)
    fuzzing = batch_messages("x", [{"kind": "random", "seq_id": 9, "label": 0, "highlight": [True]}], tokens)
    assert fuzzing[0]["content"] == FUZZING_INSTRUCTION
    assert "Excerpt 1: <<c>>" in _lines(fuzzing)


def test_read_answer_accepts_lists_in_context():
    assert read_answer("[1, 0, 1]", 3) == ([1, 0, 1], None)
    assert read_answer("Sure. Excerpts 1 and 3 match: [1,0,1]. Hope that helps.", 3) == ([1, 0, 1], None)
    assert read_answer("```json\n[0, 0, 1, 1]\n```", 4) == ([0, 0, 1, 1], None)
    assert read_answer("[true, false, true]", 3) == ([1, 0, 1], None)
    # a wrong list first, the right one later: the first list that fits wins
    assert read_answer("Excerpts [1, 3] match, so: [1, 0, 1]", 3) == ([1, 0, 1], None)
    assert read_answer("[[1, 0]]", 2) == ([1, 0], None)


@pytest.mark.parametrize("text, got", [
    ("[1, 0]", "[1, 0] (2 values)"),
    ("[1, 0, 2]", "[1, 0, 2] (3 values)"),
    ("[1, 0, 0.5]", "[1, 0, 0.5]"),
    ('["1", "0", "1"]', '["1", "0", "1"]'),
    ("[1.0, 0.0, 1.0]", "[1.0, 0.0, 1.0]"),
    ("yes, no, yes", "no JSON list"),
    ("[1, 0, 1", "no JSON list"),
    ("", "no JSON list"),
])
def test_read_answer_rejects(text, got):
    values, error = read_answer(text, 3)
    assert values is None
    assert error.startswith("expected a JSON list of 3 values 0 or 1, got")
    assert got in error


def _tokens(pieces: list[str], p_one: float = 0.75) -> list[tuple[str, dict[str, float]]]:
    """An answer's tokens as an endpoint reports them: each digit with "1" at p_one, "0" at the rest."""
    digits = {"1": math.log(p_one), "0": math.log(1 - p_one)}
    return [(t, digits if t.strip() in digits else {t: 0.0}) for t in pieces]


def test_answer_probabilities_read_each_value_of_the_list_read():
    # prose with a digit before the list, a space inside a digit token: only the list's digits count
    pieces = ["Excerpt", " 1", ":", " [", "1", ",", " 0", ",", "1", "]"]
    assert read_answer("".join(pieces), 3) == ([1, 0, 1], None)
    assert answer_probabilities("".join(pieces), _tokens(pieces), 3) == pytest.approx([0.75] * 3)
    # renormalised over the two digits: other alternatives do not count
    tokens = [("[", {"[": 0.0}), ("1", {"1": math.log(0.3), "0": math.log(0.1), "yes": math.log(0.5)}), ("]", {})]
    assert answer_probabilities("[1]", tokens, 1) == pytest.approx([0.75])
    # a digit missing from the alternatives counts as probability 0
    assert answer_probabilities("[0]", [("[", {}), ("0", {"0": -0.1}), ("]", {})], 1) == [0.0]


@pytest.mark.parametrize("text, pieces", [
    ("[1,0]", ["[", "1", ",", "0", "]"]),  # 2 values where 3 are asked: no list read
    ("[true,0,1]", ["[", "true", ",", "0", ",", "1", "]"]),  # a value that is no digit token
    ("[1, 0, 1]", ["[", "1", ",", "0", ",", "1", "]"]),  # tokens that spell another text
])
def test_answer_probabilities_are_unknown_unless_every_value_has_its_digit(text, pieces):
    assert answer_probabilities(text, _tokens(pieces), 3) == [None] * 3


def test_balanced_accuracy():
    labels = [1, 1, 0, 0, 0]
    assert balanced_accuracy(labels, labels) == 1.0
    assert balanced_accuracy(labels, [1] * 5) == 0.5
    assert balanced_accuracy(labels, [0] * 5) == 0.5
    assert balanced_accuracy(labels, [1 - x for x in labels]) == 0.0
    assert math.isnan(balanced_accuracy([1, 1], [1, 0]))
    assert math.isnan(balanced_accuracy([0, 0], [0, 0]))
    assert math.isnan(balanced_accuracy([], []))
    # 3 positives, 1 found (TPR 1/3); 6 negatives, 5 rejected (TNR 5/6): (1/3 + 5/6) / 2 = 7/12
    labels = [1, 1, 1, 0, 0, 0, 0, 0, 0]
    predictions = [1, 0, 0, 0, 0, 0, 0, 0, 1]
    assert balanced_accuracy(labels, predictions) == pytest.approx(7 / 12)
    assert balanced_accuracy(labels, predictions) != pytest.approx(6 / 9)  # not plain accuracy
    with pytest.raises(ValueError):
        balanced_accuracy([1, 0], [1])


def test_scores_from_answers_per_kind_and_unanswered():
    examples = ([{"kind": "positive", "label": 1}] * 2 + [{"kind": "random", "label": 0}] * 2
                + [{"kind": "hard_negative", "label": 0}] * 2)
    scores = scores_from_answers(examples, [1, None, 0, 0, 1, None])
    # positives: 1/1 found; random: 2/2 rejected; hard negatives: 0/1 rejected
    assert scores["random"] == 1.0
    assert scores["hard_negative"] == 0.5
    assert scores["all"] == pytest.approx((1 + 2 / 3) / 2)
    assert (scores["n_positive"], scores["n_random"], scores["n_hard_negative"], scores["n_unanswered"]) == (1, 2, 1, 2)
    no_hard = scores_from_answers(examples[:4], [1, 1, 0, 1])
    assert math.isnan(no_hard["hard_negative"]) and no_hard["random"] == 0.75
    unanswered = scores_from_answers(examples, [None] * 6)
    assert math.isnan(unanswered["all"]) and unanswered["n_unanswered"] == 6
    assert math.isnan(scores["auroc"])  # no p("1") given
    # the AUROC of the known p("1"), positives against all negatives: 0.9 beats all 3, 0.2 beats 0.1 only
    with_p = scores_from_answers(examples, [1, 0, 0, 0, 1, None], [0.9, 0.2, 0.3, 0.1, 0.6, None])
    assert with_p["auroc"] == pytest.approx((3 + 1) / 6)


MAX_ACTIVATION = 10.0
POSITIVES = [(1, np.array([0.0, 5.0, 10.0, 0.5, 1.0])), (2, np.array([9.0, 0.0, 0.0, 0.0, 0.0])),
             (3, np.array([2.0, 2.0, 2.0, 0.0, 0.0]))]
RANDOM = [(10, np.array([0.0, 0.5, 0.99, -3.0, 0.1])),  # below 10% of the max activation: kept
          (11, np.array([0.0, 1.0, 0.0, 0.0, 0.0])),  # exactly 10%: activates, left out
          (12, np.array([0.0, 0.0, 4.0, 0.0, 0.0])),  # activates, left out
          (13, np.zeros(5))]
HARD_NEGATIVES = [(20, np.array([0.2, 0.0, 0.0, 0.3, 0.0])), (21, np.array([0.0, 0.0, 0.0, 0.0, 2.0])),
        (22, np.zeros(5))]
TOKENS = {20: [" cat", "s", " Cat", "cat ", " dog"], 21: ["a", " cat", "b", "c", "d"],
          22: ["no", " top", " token", " here", "!"]}


def test_detection_examples_filter_activating_negatives():
    examples = detection_examples(POSITIVES, RANDOM, HARD_NEGATIVES, MAX_ACTIVATION)
    assert [(e["kind"], e["seq_id"], e["label"]) for e in examples] == [
        ("positive", 1, 1), ("positive", 2, 1), ("positive", 3, 1),
        ("random", 10, 0), ("random", 13, 0), ("hard_negative", 20, 0), ("hard_negative", 22, 0)]
    assert all("highlight" not in e for e in examples)
    assert detection_examples(POSITIVES, RANDOM, HARD_NEGATIVES, 100.0)[3:5] == [
        {"kind": "random", "seq_id": s, "label": 0} for s in (10, 11)]


def test_fuzzing_examples_highlights():
    examples = fuzzing_examples(POSITIVES, RANDOM, HARD_NEGATIVES, MAX_ACTIVATION, TOKENS, {"cat"}, seed=3)
    by_seq = {(e["kind"], e["seq_id"]): e for e in examples}
    assert sorted(by_seq) == [("hard_negative", 20), ("hard_negative", 22), ("positive", 1), ("positive", 2),
                              ("positive", 3), ("random", 10), ("random", 13)]
    # positives: value >= 1 on the neuron's 0-10 scale, i.e. activation >= 1.0 with max activation 10
    assert by_seq["positive", 1]["highlight"] == [False, True, True, False, True]
    assert by_seq["positive", 2]["highlight"] == [True, False, False, False, False]
    assert by_seq["positive", 3]["highlight"] == [True, True, True, False, False]
    # random negatives: the median positive count (3, 1, 3 -> 3) at random positions
    for seq_id in (10, 13):
        assert sum(by_seq["random", seq_id]["highlight"]) == 3
    # hard negatives: positions of top tokens compared after strip; random fallback when none
    assert by_seq["hard_negative", 20]["highlight"] == [True, False, False, True, False]
    assert sum(by_seq["hard_negative", 22]["highlight"]) == 3
    assert all(e["label"] == (e["kind"] == "positive") for e in examples)
    again = fuzzing_examples(POSITIVES, RANDOM, HARD_NEGATIVES, MAX_ACTIVATION, TOKENS, {"cat"}, seed=3)
    assert again == examples
    others = [fuzzing_examples(POSITIVES, RANDOM, HARD_NEGATIVES, MAX_ACTIVATION, TOKENS, {"cat"}, seed=s)
              for s in range(10)]
    assert len({str([e["highlight"] for e in x if e["kind"] == "random"]) for x in others}) > 1


def test_fuzzing_positive_without_activating_token_is_left_out():
    quiet = [(5, np.array([0.5, 0.0]))]
    examples = fuzzing_examples(POSITIVES + quiet, [], [], MAX_ACTIVATION, TOKENS, set())
    assert [e["seq_id"] for e in examples] == [1, 2, 3]


def test_top_token_texts_are_the_top_token_ids_of_the_hard_negative_search_as_texts():
    def window(at: int, value: float = 1.0) -> np.ndarray:
        return np.where(np.arange(4) == at, value, 0.0)

    tokens = {0: ["a", " cat", "b", "c"], 1: ["a", "b", " cat", "c"], 2: ["cat", "x", "y", "z"],
              3: ["q", "q", "cat", "q"], 4: [" dog", "q", "q", "q"], 5: ["q", "q", "q", " emu"]}
    top = [(0, window(1, 5.0)), (1, window(2)), (2, window(0)), (3, window(2)), (4, window(0)), (5, window(3))]
    # " cat" and "cat" are different tokens (2 records each): with " dog" (first of the single ones) the
    # top 3; texts are stripped, so " cat" and "cat" are one text
    assert top_token_texts(top, tokens) == {"cat", "dog"}
    assert top_token_texts(top, tokens, n=1) == {"cat"}
    assert top_token_texts([(s, -a) for s, a in top], tokens) == set()  # never activates: no top token
    assert top_token_texts([], tokens) == set()


def test_batches_seeded_and_complete():
    examples = [{"kind": "positive" if i < 12 else "random", "seq_id": i, "label": int(i < 12)} for i in range(25)]
    first = batches(examples, 10, seed=1)
    assert [len(b) for b in first] == [10, 10, 5]
    ids = [e["seq_id"] for b in first for e in b]
    assert sorted(ids) == list(range(25))
    assert ids != list(range(25))
    assert batches(examples, 10, seed=1) == first
    assert [e["seq_id"] for b in batches(examples, 10, seed=2) for e in b] != ids
    assert batches([], 10, seed=0) == []
    assert [len(b) for b in batches(examples[:3])] == [3]
    with pytest.raises(ValueError):
        batches(examples, 0)
