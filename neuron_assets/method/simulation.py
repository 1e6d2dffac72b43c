"""Expected activations from the simulator's distribution over the values 0-10 (docs/method.md, Simulation).

At the position after each `token<TAB>`, the simulator's next-token probabilities over the
value tokens are kept, renormalised over those tokens only, and turned into an expected value.
A position with no probability on any value is a failure (NaN), never a silent 0.
"""

import numpy as np

VALUES = tuple(range(11))


def value_distribution(first_token_probs: np.ndarray, zero_after_one: np.ndarray | None) -> np.ndarray:
    """Probabilities [T, 11] over the values 0..10.

    Where "10" is tokenised as "1" then "0": first_token_probs [T, 10] holds p("0".."9") and
    zero_after_one [T] holds z = p("0" | ..."1"), so by the chain rule
    p(1) = p("1") * (1 - z) and p(10) = p("1") * z. With zero_after_one None the input is
    already [T, 11] (a tokenizer with a single "10" token) and is returned as float64.
    """
    probs = np.asarray(first_token_probs, dtype=np.float64)
    if zero_after_one is None:
        if probs.ndim != 2 or probs.shape[1] != len(VALUES):
            raise ValueError(f"expected probabilities [T, 11], got {probs.shape}")
        return probs
    z = np.asarray(zero_after_one, dtype=np.float64)
    if probs.ndim != 2 or probs.shape[1] != 10 or z.shape != probs.shape[:1]:
        raise ValueError(f"expected [T, 10] and [T], got {probs.shape} and {z.shape}")
    out = np.concatenate([probs, np.zeros((len(probs), 1))], axis=1)
    out[:, 1] = probs[:, 1] * (1 - z)
    out[:, 10] = probs[:, 1] * z
    return out


def expected_values(probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """EV = sum_v v * p_v / sum_v p_v over v = 0..10 (probs [T, 11], need not sum to 1).

    Returns (ev float32 [T], failed bool [T]); failed rows (digit mass 0 or not finite) get
    EV NaN, so that scoring can count them instead of mistaking them for a prediction of 0.
    """
    probs = np.asarray(probs, dtype=np.float64)
    mass = probs.sum(axis=1)
    failed = ~(np.isfinite(mass) & (mass > 0))
    with np.errstate(divide="ignore", invalid="ignore"):
        ev = probs @ np.asarray(VALUES, dtype=np.float64) / mass
    return np.where(failed, np.nan, ev).astype(np.float32), failed
