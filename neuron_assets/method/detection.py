"""Detection and fuzzing scorers (EleutherAI "delphi", 2024; docs/method.md, Scores).

An LLM judge reads one explanation and a batch of whole excerpts (token windows) and answers with a
JSON list of 0/1, one per excerpt:
- detection: 1 = the neuron fires somewhere in this excerpt;
- fuzzing: the excerpt has tokens highlighted as `<<...>>`; 1 = the highlighted tokens are what the
  explanation describes.
A judge that writes the list is read with `read_answer`, and where its endpoint reports the
logprobs of the answer's tokens, p("1") of each value with `answer_probabilities`; a judge in this
process does not write: it decides each value from the logits of "0" and "1"
(resources/local_judge.py), so every excerpt gets a decision and a p("1").

Examples are plain dicts `{"kind": "positive" | "random" | "hard_negative", "seq_id": int, "label": 0 | 1}`
(fuzzing adds `"highlight": list[bool]`, one flag per token). Positives are the neuron's top records
(label 1); negatives (label 0) are random windows, or hard negatives: windows that hold the neuron's
top tokens without activating. A window activates when some token reaches 10% of the neuron's maximum
activation m, i.e. its 0-10 value `min(10, floor(10 * max(a, 0) / m))` is >= 1
(`prompts.normalized_values`).

Flow for one neuron and explanation: `detection_examples` / `fuzzing_examples` -> `batches` ->
`batch_messages` per batch -> judge -> a decision (None where the answer could not be read or the
request failed) and p("1") (None where unknown) per example -> `scores_from_answers` (balanced
accuracy per negative kind; AUROC of p("1")).
"""

import json
from collections.abc import Mapping

import numpy as np

from neuron_assets.method import records
from neuron_assets.method.embedding import auroc
from neuron_assets.method.prompts import (
    EXPLANATION_PREFIX,
    display_token,
    normalized_values,
)

HIGHLIGHT_OPEN = "<<"
HIGHLIGHT_CLOSE = ">>"
BATCH_SIZE = 10
KINDS = ("positive", "random", "hard_negative")

_PREAMBLE = (
    "You are helping to interpret the neurons of a language model. A neuron responds to one specific "
    "feature of text. You are given numbered excerpts of text, followed by a description of the "
    "feature one neuron detects. The excerpts are plain text; \\n and \\t stand for a line break and a "
    "tab. "
)

DETECTION_INSTRUCTION = _PREAMBLE + (
    "Some excerpts contain the feature, so the neuron fires on them; the rest do not. Judge each "
    "excerpt on its own: does the described feature occur anywhere in it? Reply with a JSON list "
    "holding one integer per excerpt, in the order given: 1 if the neuron fires on that excerpt, 0 if "
    "it does not."
)

FUZZING_INSTRUCTION = _PREAMBLE + (
    f"In every excerpt some tokens are marked as {HIGHLIGHT_OPEN}marked text{HIGHLIGHT_CLOSE}. In some "
    "excerpts the marks sit exactly on the tokens where the neuron fires; in the others they were put "
    "on tokens the neuron ignores. Judge each excerpt on its own: are the marked tokens instances of "
    "the described feature? Reply with a JSON list holding one integer per excerpt, in the order "
    "given: 1 if the marked tokens match the description, 0 if they do not."
)

Record = tuple[int, np.ndarray]  # (seq_id, activations of the window)


# --- prompts -------------------------------------------------------------------------------------


def excerpt_text(tokens: list[str], highlight: list[bool] | None = None) -> str:
    """Tokens joined after `display_token` (so the excerpt stays on one line); with `highlight`, each
    run of consecutive highlighted tokens is wrapped once as `<<run>>`. Plain text: nothing else is
    escaped."""
    if highlight is None:
        highlight = [False] * len(tokens)
    if len(highlight) != len(tokens):
        raise ValueError(f"{len(tokens)} tokens but {len(highlight)} highlight flags")
    parts, inside = [], False
    for token, marked in zip(tokens, highlight):
        if marked != inside:
            parts.append(HIGHLIGHT_OPEN if marked else HIGHLIGHT_CLOSE)
            inside = marked
        parts.append(display_token(token))
    if inside:
        parts.append(HIGHLIGHT_CLOSE)
    return "".join(parts)


def _user_message(explanation: str, texts: list[str], meaning_of_one: str) -> str:
    """`Excerpt {i}: {text}` per excerpt (i = 1..n), a blank line, `Neuron behavior: ...find
    {explanation}.`, the closing request for n values. The excerpts come first: the prompts of every
    explanation of a neuron then share them, and a judge in this process computes them once."""
    n = len(texts)
    lines = "".join(f"Excerpt {i}: {text}\n" for i, text in enumerate(texts, 1))
    return (
        f"{lines}\nNeuron behavior: {EXPLANATION_PREFIX} {explanation}.\n"
        f"Answer with a JSON list of {n} integers, 0 or 1, one per excerpt in excerpt order "
        f"(1 = {meaning_of_one})."
    )


def detection_messages(explanation: str, excerpts: list[list[str]]) -> list[dict]:
    """System instruction and one user turn listing the excerpts (tokens of each) to judge."""
    texts = [excerpt_text(tokens) for tokens in excerpts]
    user = _user_message(explanation, texts, "the neuron fires on this excerpt")
    return [{"role": "system", "content": DETECTION_INSTRUCTION}, {"role": "user", "content": user}]


def fuzzing_messages(explanation: str, excerpts: list[tuple[list[str], list[bool]]]) -> list[dict]:
    """Like `detection_messages`; each excerpt is (tokens, highlight flags) and shows its highlighted
    runs as `<<...>>`."""
    texts = [excerpt_text(tokens, highlight) for tokens, highlight in excerpts]
    user = _user_message(explanation, texts, "the highlighted tokens are what the explanation describes")
    return [{"role": "system", "content": FUZZING_INSTRUCTION}, {"role": "user", "content": user}]


def batch_messages(explanation: str, batch: list[dict], tokens: Mapping[int, list[str]]) -> list[dict]:
    """Messages for one batch of examples: fuzzing when the examples carry "highlight", detection
    otherwise. `tokens` maps seq_id to that window's tokens."""
    if batch and "highlight" in batch[0]:
        return fuzzing_messages(explanation, [(tokens[e["seq_id"]], e["highlight"]) for e in batch])
    return detection_messages(explanation, [tokens[e["seq_id"]] for e in batch])


# --- answers -------------------------------------------------------------------------------------


def _binary(values) -> list[int] | None:
    """The list as ints if every item is 0, 1, false or true (not 0.0, not "1"); else None."""
    if not isinstance(values, list) or not all(type(v) in (int, bool) and v in (0, 1) for v in values):
        return None
    return [int(v) for v in values]


def _find_answer(text: str, n: int) -> tuple[list[int] | None, int, int, str | None]:
    """(values, start, end, None) for the first JSON list in `text` of exactly n items 0/1 (true/false
    read as 1/0), text[start:end] being the list; else (None, -1, -1, error)."""
    decoder = json.JSONDecoder()
    first = None
    start = text.find("[")
    while start != -1:
        try:
            value, end = decoder.raw_decode(text, start)
        except json.JSONDecodeError:
            value = None
        if isinstance(value, list):
            values = _binary(value)
            if values is not None and len(values) == n:
                return values, start, end, None
            if first is None:
                first = value
        start = text.find("[", start + 1)
    expected = f"expected a JSON list of {n} values 0 or 1"
    if first is not None:
        return None, -1, -1, f"{expected}, got {json.dumps(first)[:200]} ({len(first)} values)"
    return None, -1, -1, f"{expected}, got no JSON list in {text.strip()[:200]!r}"


def read_answer(text: str, n: int) -> tuple[list[int] | None, str | None]:
    """The first JSON list in `text` of exactly n items, each 0 or 1 (true/false read as 1/0), with
    anything around it (prose, a ```json fence) ignored: (values, None). Else (None, error) naming
    the first list found or saying none was; never a default answer."""
    values, _, _, error = _find_answer(text, n)
    return values, error


def answer_probabilities(text: str, tokens: list[tuple[str, dict[str, float]]], n: int) -> list[float | None]:
    """p("1") of each of the n values of the answer list `read_answer` reads in `text`, from the
    answer's tokens: (token text, {alternative text: logprob}) each, the token among its alternatives.

    The k-th token inside the list whose text, stripped, is "0" or "1" holds value k; there
    p = e^l1 / (e^l1 + e^l0), l_d the largest logprob of an alternative that is d once stripped, a
    digit missing from the alternatives counting as probability 0. All None where the tokens do not
    spell `text`, the list holds other than n such tokens, or a token has neither digit."""
    if "".join(token for token, _ in tokens) != text:
        return [None] * n
    _, start, end, _ = _find_answer(text, n)
    probabilities, position = [], 0
    for token, alternatives in tokens:
        if start <= position < end and token.strip() in ("0", "1"):
            best = {d: max((lp for t, lp in alternatives.items() if t.strip() == d), default=-np.inf) for d in "01"}
            if np.isinf(best["0"]) and np.isinf(best["1"]):
                return [None] * n
            top = max(best.values())
            weights = {d: np.exp(lp - top) for d, lp in best.items()}
            probabilities.append(float(weights["1"] / (weights["0"] + weights["1"])))
        position += len(token)
    return probabilities if start >= 0 and len(probabilities) == n else [None] * n


# --- scores --------------------------------------------------------------------------------------


def balanced_accuracy(labels: list[int], predictions: list[int]) -> float:
    """(TPR + TNR) / 2 with TPR = share of label-1 items predicted 1 and TNR = share of label-0 items
    predicted 0. NaN when either class is empty."""
    if len(labels) != len(predictions):
        raise ValueError(f"{len(labels)} labels but {len(predictions)} predictions")
    labels, predictions = np.asarray(labels, int), np.asarray(predictions, int)
    positive, negative = labels == 1, labels == 0
    if not positive.any() or not negative.any():
        return float("nan")
    tpr = np.mean(predictions[positive] == 1)
    tnr = np.mean(predictions[negative] == 0)
    return float((tpr + tnr) / 2)


def scores_from_answers(examples: list[dict], predictions: list[int | None],
                        p_one: list[float | None] | None = None) -> dict:
    """Balanced accuracy of positives against all negatives ("all"), random negatives ("random") and
    hard negatives ("hard_negative"); predictions align with examples, None = unanswered (excluded and
    counted in n_unanswered). n_positive / n_random / n_hard_negative count the answered examples of
    each kind. "auroc": `embedding.auroc` of the judge's p("1") (aligned with examples; None = unknown,
    left out), positives against all negatives: the probability that a random positive gets a
    higher p("1") than a random negative, ties 1/2; NaN without p_one."""
    p_one = [None] * len(examples) if p_one is None else p_one
    if not len(examples) == len(predictions) == len(p_one):
        raise ValueError(f"{len(examples)} examples but {len(predictions)} predictions and {len(p_one)} p_one")
    answered = [(e, p) for e, p in zip(examples, predictions) if p is not None]

    def accuracy(kinds: tuple[str, ...]) -> float:
        pairs = [(e["label"], p) for e, p in answered if e["kind"] in kinds]
        return balanced_accuracy([label for label, _ in pairs], [p for _, p in pairs])

    counts = {f"n_{kind}": sum(e["kind"] == kind for e, _ in answered) for kind in KINDS}
    known = [(e["label"], p) for e, p in zip(examples, p_one) if p is not None]
    return {
        "all": accuracy(KINDS),
        "random": accuracy(("positive", "random")),
        "hard_negative": accuracy(("positive", "hard_negative")),
        "auroc": auroc([p for label, p in known if label == 1], [p for label, p in known if label == 0]),
        **counts,
        "n_unanswered": len(examples) - len(answered),
    }


# --- examples ------------------------------------------------------------------------------------


def levels(activations: np.ndarray, max_activation: float) -> list[int]:
    """0-10 value per token on the neuron's scale: min(10, floor(10 * max(a, 0) / m)) with m = the
    larger of `max_activation` (the neuron's) and the window's own max; all 0 when m <= 0."""
    return normalized_values([np.asarray(activations, np.float64), np.array([max_activation], np.float64)])[0]


def activates(activations: np.ndarray, max_activation: float) -> bool:
    """Whether some token reaches 10% of the neuron's max activation (a value >= 1 in `levels`)."""
    return max(levels(activations, max_activation), default=0) >= 1


def _negatives(windows: list[Record], max_activation: float) -> list[Record]:
    return [(seq_id, acts) for seq_id, acts in windows if not activates(acts, max_activation)]


def detection_examples(positives: list[Record], random_records: list[Record],
                       hard_negatives: list[Record], max_activation: float) -> list[dict]:
    """Positives (label 1), then random and hard negatives (label 0), in the order given. Negative
    windows that activate (some token >= 10% of `max_activation`) are left out."""
    return (
        [{"kind": "positive", "seq_id": int(s), "label": 1} for s, _ in positives]
        + [{"kind": "random", "seq_id": int(s), "label": 0} for s, _ in _negatives(random_records, max_activation)]
        + [{"kind": "hard_negative", "seq_id": int(s), "label": 0}
           for s, _ in _negatives(hard_negatives, max_activation)]
    )


def _random_highlight(length: int, count: int, rng: np.random.Generator) -> list[bool]:
    flags = [False] * length
    for i in rng.choice(length, size=min(count, length), replace=False):
        flags[int(i)] = True
    return flags


def top_token_texts(top: list[Record], tokens: Mapping[int, list[str]], n: int = records.N_TOP_TOKENS) -> set[str]:
    """The stripped texts of the neuron's top tokens as `records.top_tokens` picks them (the tokens
    that found its hard negatives): the up to n most frequent tokens at the argmax of its `top`
    records, none when its max activation is <= 0. `tokens` maps seq_id to the window's tokens;
    each distinct token text stands for one token id."""
    if not top:
        return set()
    ids: dict[str, int] = {}
    token_ids = np.array([[ids.setdefault(t, len(ids)) for t in tokens[seq_id]] for seq_id, _ in top])  # [K, T]
    [chosen] = records.top_tokens(np.arange(len(top))[None], np.stack([acts for _, acts in top])[None], token_ids, n)
    texts = list(ids)
    return {texts[i].strip() for i in chosen}


def fuzzing_examples(positives: list[Record], random_records: list[Record], hard_negatives: list[Record],
                     max_activation: float, tokens: Mapping[int, list[str]], top_tokens: set[str],
                     seed: int = 0) -> list[dict]:
    """Like `detection_examples`, each with a "highlight" flag per token:
    - positive: the tokens at >= 10% of `max_activation` (value >= 1); a positive with none is left out;
    - random negative: k tokens at seeded random positions, k = the median number of highlighted
      tokens over the positives, rounded, at least 1;
    - hard negative: the tokens whose text, stripped, is one of `top_tokens` (stripped;
      `top_token_texts`); k random positions if none is.
    `tokens` maps seq_id to the window's tokens (needed for hard negatives)."""
    rng = np.random.default_rng(seed)
    examples = []
    for seq_id, acts in positives:
        highlight = [v >= 1 for v in levels(acts, max_activation)]
        if any(highlight):
            examples.append({"kind": "positive", "seq_id": int(seq_id), "label": 1, "highlight": highlight})
    counts = [sum(e["highlight"]) for e in examples]
    k = max(1, int(np.round(np.median(counts)))) if counts else 1
    for seq_id, acts in _negatives(random_records, max_activation):
        highlight = _random_highlight(len(acts), k, rng)
        examples.append({"kind": "random", "seq_id": int(seq_id), "label": 0, "highlight": highlight})
    top = {t.strip() for t in top_tokens}
    for seq_id, acts in _negatives(hard_negatives, max_activation):
        highlight = [t.strip() in top for t in tokens[seq_id]]
        if not any(highlight):
            highlight = _random_highlight(len(acts), k, rng)
        examples.append({"kind": "hard_negative", "seq_id": int(seq_id), "label": 0, "highlight": highlight})
    return examples


def batches(examples: list[dict], size: int = BATCH_SIZE, seed: int = 0) -> list[list[dict]]:
    """A seeded random order of the examples (so positives and negatives mix), cut into chunks of at
    most `size`; every example appears exactly once."""
    if size < 1:
        raise ValueError(f"batch size must be >= 1, got {size}")
    order = np.random.default_rng(seed).permutation(len(examples))
    shuffled = [examples[int(i)] for i in order]
    return [shuffled[i:i + size] for i in range(0, len(shuffled), size)]
