"""Revising an explanation after showing the explainer where it failed (docs/method.md, Explanation: revision
after counterexamples raised the paper's scores).

The first explanation is simulated on held-out excerpts (the calibration split, never seen by
the explainer nor used for scoring). `counterexamples` picks the excerpts where real and
simulated activations disagree most; `revision_messages` shows the explainer its original
records, its earlier explanation and those counterexamples, and asks for a better sentence that
continues `EXPLANATION_PREFIX` (clean the answer with `prompts.clean_explanation`).
"""

import json
import math

import numpy as np

from neuron_assets.method.prompts import (
    EXPLANATION_PREFIX,
    format_record,
    normalized_values,
)

REVISION_INSTRUCTION = (
    "You are helping to interpret the neurons of a language model. A neuron responds to one "
    "specific feature of a short text. Each text below is listed one token per line as "
    "token<TAB>activation. Activations are integers from 0 (the neuron is silent) to 10 (its "
    "strongest response); any non-zero value means the token matches what the neuron detects, "
    "and a larger value means a stronger match. An earlier explanation of the neuron was tested "
    "by predicting its activations on new texts, and it failed on some of them: texts where the "
    "neuron fires although the explanation predicted little, and texts where the explanation "
    "predicted activity although the neuron stays silent. Use the original texts and these "
    "failures to write an improved explanation: one sentence that describes the feature itself "
    "and fits all the texts. Do not list example words."
)

SHOWN_HEADER = "Texts the earlier explanation was written from:"
MISSES_HEADER = "Texts where the neuron fires but the earlier explanation predicted little activity:"
FALSE_ALARMS_HEADER = (
    "Texts where the earlier explanation predicted activity but the neuron is silent or weak:"
)
PREDICTED_LABEL = "The earlier explanation predicted activity on:"
REVISED_LABEL = "Revised explanation of the neuron's behavior:"

# A false alarm's token counts as "predicted active" when its simulated expected value (0-10) is
# at least this: the 10% floor under which `normalized_values` shows a real activation as 0.
PREDICTED_MIN = 1.0


def _gaps(real: np.ndarray, simulated: np.ndarray, peak: float) -> tuple[float, float]:
    """(max(r - s), max(s - r)) over tokens where s is not NaN; (-inf, -inf) if there are none."""
    r = np.maximum(np.asarray(real, np.float64).ravel(), 0.0) / peak
    s = np.asarray(simulated, np.float64).ravel() / 10.0
    if r.shape != s.shape:
        raise ValueError(f"real has {r.size} tokens but simulated has {s.size}")
    keep = ~np.isnan(s)
    if not keep.any():
        return -math.inf, -math.inf
    d = r[keep] - s[keep]
    return float(d.max()), float((-d).max())


def counterexamples(
    real: list[np.ndarray], simulated: list[np.ndarray], peak: float,
    n_misses: int = 2, n_false_alarms: int = 2, min_gap: float = 0.3,
) -> tuple[list[int], list[int]]:
    """Indices of the sequences where the simulation failed most: (misses, false alarms).

    Scales: r = max(a, 0) / peak (peak = the neuron's max activation, > 0), s = expected / 10;
    tokens with a NaN expected value are ignored. Per sequence:
      miss gap        = max over tokens of (r - s)   (the neuron fires, the simulation did not)
      false-alarm gap = max over tokens of (s - r)   (the simulation fired, the neuron did not)
    A sequence counts only for its larger gap (a tie goes to misses), so it is never both.
    Misses are the `n_misses` sequences with the largest miss gap >= min_gap, largest first
    (ties by index); false alarms likewise with `n_false_alarms`.
    """
    if not peak > 0:
        raise ValueError(f"peak must be > 0, got {peak}")
    if len(real) != len(simulated):
        raise ValueError(f"{len(real)} real sequences but {len(simulated)} simulated")
    gaps = [_gaps(r, s, peak) for r, s in zip(real, simulated)]
    misses = [(-m, i) for i, (m, f) in enumerate(gaps) if m >= min_gap and m >= f]
    alarms = [(-f, i) for i, (m, f) in enumerate(gaps) if f >= min_gap and f > m]
    return [i for _, i in sorted(misses)[:n_misses]], [i for _, i in sorted(alarms)[:n_false_alarms]]


def predicted_tokens(tokens: list[str], expected: np.ndarray) -> str:
    """`"token" (v), ...` for each token whose simulated expected value is >= PREDICTED_MIN, in
    text order; v = the expected value rounded; tokens quoted with json.dumps (one line);
    "(none)" if there is no such token."""
    expected = np.asarray(expected, np.float64).ravel()
    if len(tokens) != len(expected):
        raise ValueError(f"{len(tokens)} tokens but {len(expected)} expected values")
    listed = [
        f"{json.dumps(t, ensure_ascii=False)} ({round(float(e))})"
        for t, e in zip(tokens, expected)
        if e >= PREDICTED_MIN
    ]
    return ", ".join(listed) or "(none)"


def revision_messages(
    explanation: str,
    shown: list[tuple[list[str], np.ndarray]],
    misses: list[tuple[list[str], np.ndarray]],
    false_alarms: list[tuple[list[str], np.ndarray, np.ndarray]],
    prefill: bool = False,
) -> list[dict]:
    """Chat messages asking for a revised explanation.

    [system: REVISION_INSTRUCTION, user: the block below] (+ assistant: EXPLANATION_PREFIX with
    `prefill`, for backends that continue a final assistant turn). The user block, sections
    separated by a blank line, an empty misses or false-alarms section left out:

        SHOWN_HEADER, then the shown records (`format_record`)
        Earlier explanation: the main thing this neuron does is find {explanation}.
        MISSES_HEADER, then the misses' records with their real values
        FALSE_ALARMS_HEADER, then per false alarm its record with real values and a line
            PREDICTED_LABEL "tok" (v), ...   (see `predicted_tokens`)
        REVISED_LABEL the main thing this neuron does is find

    Real values use one scale over every record in the prompt (shown + misses + false alarms):
    `normalized_values`. `shown` are (tokens, real), misses (tokens, real), false alarms
    (tokens, real, simulated expected values 0-10).
    """
    records = [*shown, *misses, *((t, a) for t, a, _ in false_alarms)]
    values = normalized_values([np.asarray(a, np.float64) for _, a in records])
    blocks = [format_record(list(t), v) for (t, _), v in zip(records, values)]
    n_shown, n_misses = len(shown), len(misses)
    sections = [SHOWN_HEADER + "\n" + "".join(blocks[:n_shown])]
    sections.append(f"Earlier explanation: {EXPLANATION_PREFIX} {_strip_period(explanation)}.\n")
    if misses:
        sections.append(MISSES_HEADER + "\n" + "".join(blocks[n_shown : n_shown + n_misses]))
    if false_alarms:
        alarms = [
            f"{block}{PREDICTED_LABEL} {predicted_tokens(list(t), e)}\n"
            for block, (t, _, e) in zip(blocks[n_shown + n_misses :], false_alarms)
        ]
        sections.append(FALSE_ALARMS_HEADER + "\n" + "".join(alarms))
    sections.append(f"{REVISED_LABEL} {EXPLANATION_PREFIX}")
    messages = [
        {"role": "system", "content": REVISION_INSTRUCTION},
        {"role": "user", "content": "\n".join(sections)},
    ]
    if prefill:
        messages.append({"role": "assistant", "content": EXPLANATION_PREFIX})
    return messages


def _strip_period(text: str) -> str:
    text = text.strip()
    return text[:-1].rstrip() if text.endswith(".") else text


def revision_gain(first: list[float], revised: list[float]) -> float:
    """mean over neurons i with both scores finite of (revised[i] - first[i]); NaN if none.
    The summaries' gain_over_llm of every variant: `first` the llm scores, `revised` the variant's."""
    if len(first) != len(revised):
        raise ValueError(f"{len(first)} first scores but {len(revised)} revised")
    a, b = np.asarray(first, np.float64), np.asarray(revised, np.float64)
    keep = np.isfinite(a) & np.isfinite(b)
    return float(np.mean(b[keep] - a[keep])) if keep.any() else float("nan")
