"""Scores of simulated against real activations (docs/method.md, Scores).

Every score pools all tokens of all scored sequences and computes once; it is not a mean of
per-sequence scores. A failed token (the simulation is NaN there: no value 0-10 had any
probability) is counted by `score_neuron`, then handled by the failed-token rule: "zero", the
published reference's rule, scores it as an expected value of 0; "drop" leaves the position out
of both sides. rsquared and abs_dev_explained can be computed on a calibrated simulation
(`linear_calibration`); the correlations are always of the simulation as it is.

The per-neuron functions (`correlation`, `rsquared`, `absolute_dev_explained`, `score_neuron`) are
the readable definitions; `correlations` and `score_neurons` compute the same for many neurons at
once, on [n_neurons, n_tokens] arrays.
"""

import numpy as np

# `score_neurons` works on blocks of this many rows so that its float64 temporaries stay in cache:
# about twice as fast as all rows at once.
ROWS_PER_BLOCK = 256


FAILED_TOKEN_RULES = ("zero", "drop")  # NEURON_ASSETS_FAILED_TOKENS; the first is the default


def fill_failed(real: np.ndarray, simulated: np.ndarray, failed_tokens: str = "zero") -> np.ndarray:
    """The simulation (float64) under the failed-token rule. A failed token is a position where
    the simulation is NaN and the real activation is not (NaN in both is padding, left as it is).
    "zero": it becomes 0, as in the published reference; "drop": it stays NaN, so that the scores
    leave the position out."""
    simulated = np.asarray(simulated, np.float64)
    if failed_tokens not in FAILED_TOKEN_RULES:
        raise ValueError(f"unknown failed-token rule {failed_tokens!r}: use {' or '.join(FAILED_TOKEN_RULES)}")
    if failed_tokens == "drop":
        return simulated
    return np.where(np.isnan(simulated) & ~np.isnan(real), 0.0, simulated)


def _pool(real: list[np.ndarray], simulated: list[np.ndarray],
          failed_tokens: str = "zero") -> tuple[np.ndarray, np.ndarray]:
    """Concatenate sequences (float64), apply the failed-token rule and drop the positions where
    the simulation is still NaN."""
    if len(real) != len(simulated):
        raise ValueError(f"{len(real)} real sequences but {len(simulated)} simulated")
    r = [np.asarray(a, np.float64).ravel() for a in real]
    s = [np.asarray(a, np.float64).ravel() for a in simulated]
    if any(len(a) != len(b) for a, b in zip(r, s)):
        raise ValueError("real and simulated sequences differ in length")
    r, s = (np.concatenate(x) if x else np.zeros(0) for x in (r, s))
    s = fill_failed(r, s, failed_tokens)
    keep = ~np.isnan(s)
    return r[keep], s[keep]


def correlations(real: np.ndarray, simulated: np.ndarray) -> np.ndarray:
    """Pearson r per row of [n_neurons, n_tokens] arrays, over the positions where simulated is
    not NaN (padding, or failed tokens under "drop"; `fill_failed` first):
    r = sum((x - mx)(y - my)) / sqrt(sum((x - mx)^2) sum((y - my)^2)).
    NaN where either side is constant (max == min, which includes fewer than 2 tokens)."""
    real = np.asarray(real, np.float64)
    simulated = np.asarray(simulated, np.float64)
    if real.shape != simulated.shape or real.ndim != 2:
        raise ValueError(f"expected two arrays [n_neurons, n_tokens], got {real.shape} and {simulated.shape}")
    keep = ~np.isnan(simulated)
    n = keep.sum(axis=1, keepdims=True)

    def centred(x):
        x = np.where(keep, x, 0.0)
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(keep, x - x.sum(axis=1, keepdims=True) / n, 0.0)

    def constant(x):
        return x.max(axis=1, where=keep, initial=-np.inf) <= x.min(axis=1, where=keep, initial=np.inf)

    dr, ds = centred(real), centred(simulated)
    with np.errstate(divide="ignore", invalid="ignore"):
        r = (dr * ds).sum(axis=1) / np.sqrt((dr * dr).sum(axis=1) * (ds * ds).sum(axis=1))
    return np.where(constant(real) | constant(simulated), np.nan, np.clip(r, -1.0, 1.0))


def correlation(real: list[np.ndarray], simulated: list[np.ndarray], failed_tokens: str = "zero") -> float:
    """Pearson r over all tokens of all sequences pooled; NaN if either side is constant or empty."""
    r, s = _pool(real, simulated, failed_tokens)
    return float(correlations(r[None], s[None])[0])


def rsquared(real: list[np.ndarray], simulated: list[np.ndarray], failed_tokens: str = "zero") -> float:
    """1 - mean((r - p)^2) / mean(r^2), pooled. Mean of squares, not variance, as in the paper."""
    r, s = _pool(real, simulated, failed_tokens)
    denominator = np.mean(r * r) if len(r) else 0.0
    return float(1 - np.mean((r - s) ** 2) / denominator) if denominator > 0 else float("nan")


def absolute_dev_explained(real: list[np.ndarray], simulated: list[np.ndarray], failed_tokens: str = "zero") -> float:
    """1 - mean(|r - p|) / mean(|r|), pooled."""
    r, s = _pool(real, simulated, failed_tokens)
    denominator = np.mean(np.abs(r)) if len(r) else 0.0
    return float(1 - np.mean(np.abs(r - s)) / denominator) if denominator > 0 else float("nan")


def linear_calibration(real: list[np.ndarray], simulated: list[np.ndarray],
                       failed_tokens: str = "zero") -> tuple[float, float]:
    """The least-squares line real ~ slope * simulated + intercept over all tokens pooled (the
    published reference's linear calibration, fitted on the calibration split):
    slope = sum((s - ms)(r - mr)) / sum((s - ms)^2), intercept = mr - slope * ms.
    (NaN, NaN) where the simulation is constant (which includes fewer than 2 tokens): no line fits."""
    r, s = _pool(real, simulated, failed_tokens)
    if len(s) < 2 or s.max() <= s.min():
        return float("nan"), float("nan")
    ds = s - s.mean()
    slope = float((ds * (r - r.mean())).sum() / (ds * ds).sum())
    return slope, float(r.mean() - slope * s.mean())


def score_neuron(real_top, sim_top, real_random, sim_random, failed_tokens: str = "zero",
                 calibration: tuple[float, float] | None = None) -> dict:
    """The scores of one explanation: correlation over top + random (the headline score), top
    only and random only; rsquared and abs_dev_explained over all, of the simulation mapped to
    slope * p + intercept when `calibration` (slope, intercept) is given and not NaN (the
    correlations are of the simulation as it is); failed (NaN) token count. A failed token is scored as 0 (before the
    calibration maps it) or dropped, by `failed_tokens`."""
    real_all, sim_all = [*real_top, *real_random], [*sim_top, *sim_random]
    filled = [fill_failed(r, s, failed_tokens) for r, s in zip(real_all, sim_all)]
    if calibration is None or np.isnan(calibration[0]):
        mapped = filled
    else:
        slope, intercept = calibration
        mapped = [slope * s + intercept for s in filled]
    return {
        "score_all": correlation(real_all, sim_all, failed_tokens),
        "score_top": correlation(real_top, sim_top, failed_tokens),
        "score_random": correlation(real_random, sim_random, failed_tokens),
        "rsquared": rsquared(real_all, mapped, failed_tokens),
        "abs_dev_explained": absolute_dev_explained(real_all, mapped, failed_tokens),
        "n_failed_tokens": int(sum(np.isnan(np.asarray(s, np.float64)).sum() for s in sim_all)),
    }


def _fraction_explained(real: np.ndarray, simulated: np.ndarray, loss) -> np.ndarray:
    """1 - mean(loss(r - p)) / mean(loss(r)) per row, over the positions where simulated is not
    NaN; NaN where the denominator is not positive (which includes rows with no such position)."""
    keep = ~np.isnan(simulated)
    n = keep.sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        error = np.where(keep, loss(real - simulated), 0.0).sum(axis=1) / n
        scale = np.where(keep, loss(real), 0.0).sum(axis=1) / n
        return np.where(scale > 0, 1 - error / scale, np.nan)


def _score_block(real_top, sim_top, real_random, sim_random, calibration, failed_tokens) -> dict[str, np.ndarray]:
    """`score_neurons` on one block of rows."""
    real_top, sim_top, real_random, sim_random = (
        np.asarray(x, np.float64) for x in (real_top, sim_top, real_random, sim_random))
    real_all = np.concatenate([real_top, real_random], axis=1)
    n_failed_tokens = (np.isnan(np.concatenate([sim_top, sim_random], axis=1)) & ~np.isnan(real_all)).sum(axis=1)
    sim_top = fill_failed(real_top, sim_top, failed_tokens)
    sim_random = fill_failed(real_random, sim_random, failed_tokens)
    sim_all = np.concatenate([sim_top, sim_random], axis=1)
    slope, intercept = calibration[:, :1], calibration[:, 1:]
    mapped = np.where(np.isnan(slope), sim_all, slope * sim_all + intercept)
    return {
        "score_all": correlations(real_all, sim_all),
        "score_top": correlations(real_top, sim_top),
        "score_random": correlations(real_random, sim_random),
        "rsquared": _fraction_explained(real_all, mapped, np.square),
        "abs_dev_explained": _fraction_explained(real_all, mapped, np.abs),
        "n_failed_tokens": n_failed_tokens,
    }


def score_neurons(real_top, sim_top, real_random, sim_random, failed_tokens: str = "zero",
                  calibration: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """`score_neuron` for many explanations at once. Each argument is [n_explanations, n_tokens]:
    row i holds explanation i's sequences of that split concatenated. NaN in sim marks a failed
    token; a row with fewer tokens than the array is wide is padded with NaN in both real and sim,
    which is how padding is told apart from failed tokens. `calibration`: [n_explanations, 2],
    row i explanation i's (slope, intercept), or NaN where it has none. Returns the same keys as
    `score_neuron`, each a 1-D array over explanations."""
    arrays = [np.asarray(x) for x in (real_top, sim_top, real_random, sim_random)]
    if calibration is None:
        calibration = np.full((len(arrays[0]), 2), np.nan)
    arrays.append(np.asarray(calibration, np.float64).reshape(-1, 2))
    # range(0, max(n, 1)) gives zero rows one empty block, so every key is still returned.
    starts = range(0, max(len(arrays[0]), 1), ROWS_PER_BLOCK)
    blocks = [_score_block(*(x[start:start + ROWS_PER_BLOCK] for x in arrays), failed_tokens) for start in starts]
    return {key: np.concatenate([block[key] for block in blocks]) for key in blocks[0]}
