"""Token baseline explainer: an explanation built without an LLM (docs/method.md, Explanation).

It names the tokens with the highest mean activation; a real explanation should beat it.
"""

import json
from collections import defaultdict

import numpy as np


def token_baseline(
    records: list[tuple[list[str], np.ndarray]], n_tokens: int = 5, min_count: int = 2
) -> str | None:
    """Phrase continuing "the main thing this neuron does is find", e.g. `the tokens "x" and "y"`.

    mean(t) = sum of activations on token t / occurrences of t, over all records, with tokens
    compared stripped (case kept; whitespace-only tokens ignored). Candidates are tokens seen
    >= min_count times with mean > 0 (all tokens with mean > 0 if none qualify); the n_tokens
    with the highest mean are named, quoted as JSON strings so any quote or control character is
    escaped. None if no token has a positive mean.
    """
    total, count = defaultdict(float), defaultdict(int)
    for tokens, acts in records:
        for token, a in zip(tokens, np.asarray(acts, np.float64).tolist()):
            if token.strip():
                total[token.strip()] += a
                count[token.strip()] += 1
    mean = {t: total[t] / count[t] for t in total}

    def ranked(least):  # stable sort: ties keep first-seen order
        return sorted((t for t in mean if count[t] >= least and mean[t] > 0), key=lambda t: -mean[t])

    best = (ranked(min_count) or ranked(1))[:n_tokens]
    if not best:
        return None
    quoted = [json.dumps(t, ensure_ascii=False) for t in best]
    if len(quoted) == 1:
        return f"the token {quoted[0]}"
    return f"the tokens {', '.join(quoted[:-1])} and {quoted[-1]}"
