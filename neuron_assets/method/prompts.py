"""Explainer and simulator prompts (docs/method.md, Explanation and Simulation).

A record is shown as `<start>`, one `token<TAB>value` line per token, `<end>`, with values on a
0-10 scale. The explainer gets OpenAI-style chat messages; the simulator gets one plain-text
prompt: a fixed prefix (instruction + few-shot neurons) and per-token segments for the target.
"""

import hashlib
import json
from pathlib import Path

import numpy as np

EXPLANATION_PREFIX = "the main thing this neuron does is find"

EXPLAINER_INSTRUCTION = (
    "You are helping to interpret the neurons of a language model. A neuron responds to one "
    "specific feature of a short text. Each text below is listed one token per line as "
    "token<TAB>activation. Activations are integers from 0 (the neuron is silent) to 10 (its "
    "strongest response); any non-zero value means the token matches what the neuron detects, "
    "and a larger value means a stronger match. Study where the neuron is active and describe, "
    "in one sentence, the feature it detects. Describe the feature itself; do not list example "
    "words."
)

SIMULATOR_INSTRUCTION = (
    "You are helping to interpret the neurons of a language model. Given a description of the "
    "feature a neuron detects, predict how strongly the neuron fires on each token of a short "
    "text. Each text is listed one token per line as token<TAB>activation, where the activation "
    'is an integer from 0 (silent) to 10 (strongest response). A value written as "unknown" has '
    "not been revealed yet and is yours to predict. Most activations are 0."
)

ZEROS_FILTERED_NOTE = "The same activations again, with the lines whose value is 0 left out:"


def normalized_values(activations: list[np.ndarray]) -> list[list[int]]:
    """One scale shared by all records shown: m = max over records of max(a, 0),
    value = min(10, floor(10 * max(a, 0) / m)); all zeros if m <= 0."""
    m = max((float(np.max(a, initial=0.0)) for a in activations), default=0.0)
    if not m > 0:
        return [[0] * len(a) for a in activations]
    return [
        np.minimum(10, np.floor(10 * np.maximum(np.asarray(a, np.float64), 0) / m)).astype(int).tolist()
        for a in activations
    ]


def display_token(token: str) -> str:
    """Escape backslash, tab, newline and carriage return so a token fits one `token<TAB>value` row."""
    return token.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")


def format_record(tokens: list[str], values: list) -> str:
    """`<start>`, one `token<TAB>value` line per token, `<end>`; values are ints or "unknown"."""
    if len(tokens) != len(values):
        raise ValueError(f"{len(tokens)} tokens but {len(values)} values")
    rows = "".join(f"{display_token(t)}\t{v}\n" for t, v in zip(tokens, values))
    return f"<start>\n{rows}<end>\n"


def _closing(label: str) -> str:
    return f"Explanation of neuron {label} behavior: {EXPLANATION_PREFIX}"


def _explainer_block(label: str, records: list[tuple[list[str], np.ndarray]], note: str = "") -> str:
    """One neuron's records, repeated without zero lines when fewer than 20% of values are
    non-zero (so sparse activations are not lost in a sea of zeros), then `note` (if any) on a
    line of its own, then the closing phrase."""
    tokens = [list(t) for t, _ in records]
    values = normalized_values([a for _, a in records])
    text = f"Neuron {label}\nActivations:\n" + "".join(map(format_record, tokens, values))
    n_values = sum(map(len, values))
    n_nonzero = sum(v > 0 for vs in values for v in vs)
    # with no non-zero value at all the filtered copy would be empty records: skip it
    if 0 < n_nonzero and 5 * n_nonzero < n_values:
        kept = [[(t, v) for t, v in zip(ts, vs) if v > 0] for ts, vs in zip(tokens, values)]
        text += f"{ZEROS_FILTERED_NOTE}\n" + "".join(
            format_record([t for t, _ in rows], [v for _, v in rows]) for rows in kept
        )
    ending = f"{note}\n{_closing(label)}" if note else _closing(label)
    return f"{text}\n{ending}"


def explainer_messages(
    records: list[tuple[list[str], np.ndarray]], fewshot: list[dict], neuron_label: str = "4",
    prefill: bool = False, note: str = "",
) -> list[dict]:
    """Chat messages: system instruction, a user/assistant pair per few-shot neuron (labelled
    1, 2, ...), then the target neuron's user turn, which ends with `note` (more about the target,
    e.g. method/output.py's promoted tokens) and the closing phrase.

    With `prefill` (backends that continue a final assistant message, like a local model), the
    answers restate the phrase and the target's answer is begun with it, so the model completes
    "the main thing this neuron does is find ..." instead of starting a reply of its own.
    """
    lead = f"{EXPLANATION_PREFIX} " if prefill else ""
    messages = [{"role": "system", "content": EXPLAINER_INSTRUCTION}]
    for i, neuron in enumerate(fewshot, 1):
        shots = [(r["tokens"], np.asarray(r["activations"], np.float64)) for r in neuron["records"]]
        messages.append({"role": "user", "content": _explainer_block(str(i), shots)})
        messages.append({"role": "assistant", "content": f"{lead}{neuron['explanation']}."})
    messages.append({"role": "user", "content": _explainer_block(neuron_label, records, note)})
    if prefill:
        messages.append({"role": "assistant", "content": EXPLANATION_PREFIX})
    return messages


def clean_explanation(text: str) -> str:
    """First non-empty line, whitespace stripped, a restated closing phrase and one trailing
    period dropped."""
    line = text.strip().split("\n", 1)[0].strip()
    if line.lower().startswith(EXPLANATION_PREFIX):
        line = line[len(EXPLANATION_PREFIX) :].strip()
    return line[:-1].rstrip() if line.endswith(".") else line


def _simulator_header(label: str, explanation: str) -> str:
    return (
        f"Neuron {label}\n"
        f"Explanation of neuron {label} behavior: {EXPLANATION_PREFIX} {explanation}.\n"
        "Activations:\n"
    )


def simulator_prefix(fewshot: list[dict]) -> str:
    """Instruction and few-shot neurons. Each few-shot record shows "unknown" before
    `reveal_from` and real values after it: that switch is what teaches the model to put a
    distribution over 0-10 after each tab. Independent of the target, so its KV cache is reusable."""
    parts = [SIMULATOR_INSTRUCTION, "\n\n"]
    for i, neuron in enumerate(fewshot, 1):
        acts, reveal_from = neuron["activations"], neuron["reveal_from"]
        shown = ["unknown" if j < reveal_from else int(v) for j, v in enumerate(acts)]
        record = format_record(neuron["tokens"], shown)
        parts.append(_simulator_header(str(i), neuron["explanation"]) + record + "\n")
    return "".join(parts)


def simulator_target_header(explanation: str, neuron_label: str = "4") -> str:
    """The start of the target neuron after `simulator_prefix`, up to its first token: the same for
    every sequence simulated with this explanation."""
    return _simulator_header(neuron_label, explanation) + "<start>\n"


def simulator_segments(explanation: str, tokens: list[str], neuron_label: str = "4") -> list[str]:
    """The target neuron after `simulator_prefix`, cut so that segment i ends with the tab after
    token i: the simulator's next-token distribution there is its prediction for token i. Segment
    0 starts with `simulator_target_header`."""
    if not tokens:
        return []
    first = simulator_target_header(explanation, neuron_label) + display_token(tokens[0]) + "\t"
    return [first] + [f"unknown\n{display_token(t)}\t" for t in tokens[1:]]


def load_fewshot(path) -> list[dict]:
    """Few-shot neurons from JSON: explainer neurons {explanation, records: [{tokens,
    activations}]} or simulator neurons {explanation, tokens, activations (0-10), reveal_from}."""
    path = Path(path)
    neurons = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(neurons, list) or not neurons:
        raise ValueError(f"{path}: expected a non-empty JSON list of neurons")
    for i, neuron in enumerate(neurons):
        where = f"{path}: neuron {i}"
        if not isinstance(neuron, dict):
            raise ValueError(f"{where}: expected an object")
        _require(neuron, "explanation", where)
        if "records" in neuron:
            for j, record in enumerate(neuron["records"]):
                _check_record(record, f"{where}, record {j}")
        elif "tokens" in neuron:
            _check_record(neuron, where)
            _require(neuron, "reveal_from", where)
            if not all(isinstance(v, int) and 0 <= v <= 10 for v in neuron["activations"]):
                raise ValueError(f"{where}: simulator activations must be integers 0-10")
            if not 0 <= neuron["reveal_from"] <= len(neuron["tokens"]):
                raise ValueError(f"{where}: reveal_from out of range")
        else:
            raise ValueError(f"{where}: missing field 'records' (explainer) or 'tokens' (simulator)")
    return neurons


def _require(obj: dict, field: str, where: str) -> None:
    if field not in obj:
        raise ValueError(f"{where}: missing field '{field}'")


def _check_record(record, where: str) -> None:
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected an object")
    _require(record, "tokens", where)
    _require(record, "activations", where)
    if len(record["tokens"]) != len(record["activations"]):
        n_tokens, n_acts = len(record["tokens"]), len(record["activations"])
        raise ValueError(f"{where}: {n_tokens} tokens but {n_acts} activations")


def prompt_version(*parts: str) -> str:
    """First 16 hex chars of sha256 over the parts joined by NUL (templates + few-shot text)."""
    return hashlib.sha256("\x00".join(parts).encode("utf-8")).hexdigest()[:16]
