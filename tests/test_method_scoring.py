import math

import numpy as np
import pytest

from neuron_assets.method import scoring
from neuron_assets.method.scoring import (
    absolute_dev_explained,
    correlation,
    correlations,
    rsquared,
    score_neuron,
    score_neurons,
)
from neuron_assets.method.simulation import VALUES, expected_values, value_distribution


def test_expected_values_renormalise_and_flag_failures():
    probs = np.zeros((4, 11))
    probs[0, [0, 2]] = [0.2, 0.3]  # mass 0.5: EV = (0 * 0.2 + 2 * 0.3) / 0.5
    probs[1, 10] = 0.01
    probs[2, [1, 9]] = [0.25, 0.75]
    probs[3] = 0.0  # no digit at all: a failure, not a prediction of 0
    ev, failed = expected_values(probs)
    assert ev.dtype == np.float32 and failed.dtype == bool
    np.testing.assert_allclose(ev[:3], [1.2, 10.0, 7.0], rtol=1e-6)
    assert np.isnan(ev[3])
    assert failed.tolist() == [False, False, False, True]
    ev, failed = expected_values(np.full((1, 11), np.nan))
    assert failed.tolist() == [True] and np.isnan(ev[0])
    assert VALUES == tuple(range(11))


def test_value_distribution_chain_rule_for_two_token_ten():
    first = np.zeros((2, 10))
    first[0, [0, 1]] = [0.5, 0.5]
    first[1, [1, 3]] = [0.2, 0.8]
    dist = value_distribution(first, np.array([0.4, 0.0]))
    assert dist.shape == (2, 11)
    np.testing.assert_allclose(dist[0], [0.5, 0.3, 0, 0, 0, 0, 0, 0, 0, 0, 0.2])
    np.testing.assert_allclose(dist[1], [0, 0.2, 0, 0.8, 0, 0, 0, 0, 0, 0, 0])
    ev, _ = expected_values(dist)
    np.testing.assert_allclose(ev, [0.3 + 2.0, 0.2 + 2.4], rtol=1e-6)
    single = value_distribution(np.ones((3, 11), np.float32), None)
    assert single.dtype == np.float64 and single.shape == (3, 11)
    with pytest.raises(ValueError):
        value_distribution(np.ones((3, 10)), None)


def test_pooled_correlation_differs_from_mean_of_per_sequence():
    real = [np.array([0.0, 1.0]), np.array([10.0, 11.0])]
    sim = [np.array([0.0, 1.0]), np.array([0.0, 1.0])]
    per_sequence = np.mean([correlation([r], [s]) for r, s in zip(real, sim)])
    assert per_sequence == pytest.approx(1.0)
    # pooled: cov = 1, sum of squares 101 and 1
    assert correlation(real, sim) == pytest.approx(1 / math.sqrt(101))


def test_correlation_nan_cases_and_failed_tokens():
    assert math.isnan(correlation([np.array([1.0, 2.0, 3.0])], [np.array([4.0, 4.0, 4.0])]))
    assert math.isnan(correlation([np.array([0.1] * 10)], [np.arange(10.0)]))  # constant, inexact mean
    assert math.isnan(correlation([], []))
    assert math.isnan(correlation([np.array([1.0])], [np.array([2.0])]))
    real = [np.array([1.0, 2.0, 3.0, 4.0]), np.array([0.0, 5.0])]
    sim = [np.array([1.0, np.nan, 2.0, 5.0]), np.array([0.5, np.nan])]
    dropped = np.corrcoef([1.0, 3.0, 4.0, 0.0], [1.0, 2.0, 5.0, 0.5])[0, 1]
    assert correlation(real, sim, "drop") == pytest.approx(dropped)
    zeroed = np.corrcoef([1.0, 2.0, 3.0, 4.0, 0.0, 5.0], [1.0, 0.0, 2.0, 5.0, 0.5, 0.0])[0, 1]
    assert correlation(real, sim) == pytest.approx(zeroed)  # the default: a failed token counts as 0
    with pytest.raises(ValueError, match="failed-token rule 'skip'"):
        correlation(real, sim, "skip")
    with pytest.raises(ValueError):
        correlation([np.zeros(3)], [np.zeros(2)])


def test_rsquared_and_absolute_dev_formulas():
    real, sim = [np.array([1.0, 2.0]), np.array([3.0])], [np.array([1.0, 2.0]), np.array([4.0])]
    # mean((r - p)^2) = 1/3, mean(r^2) = 14/3; mean|r - p| = 1/3, mean|r| = 2
    assert rsquared(real, sim) == pytest.approx(13 / 14)
    assert absolute_dev_explained(real, sim) == pytest.approx(5 / 6)
    # mean of squares, not variance: a constant offset is not explained away
    assert rsquared([np.array([10.0, 12.0])], [np.array([11.0, 11.0])]) == pytest.approx(1 - 1 / 122)
    assert math.isnan(rsquared([np.zeros(3)], [np.ones(3)]))
    assert math.isnan(absolute_dev_explained([np.zeros(3)], [np.ones(3)]))


def test_score_neuron():
    real_top = [np.array([0.0, 5.0, 1.0]), np.array([4.0, 0.0, 0.0])]
    sim_top = [np.array([0.0, 9.0, 2.0]), np.array([np.nan, 1.0, 0.0])]
    real_random = [np.array([0.0, 0.5, 0.0])]
    sim_random = [np.array([0.0, 0.0, 1.0])]
    scores = score_neuron(real_top, sim_top, real_random, sim_random)
    assert set(scores) == {"score_all", "score_top", "score_random", "rsquared", "abs_dev_explained", "n_failed_tokens"}
    assert scores["n_failed_tokens"] == 1
    # the failed token (real 4) is scored as an expected value of 0
    assert scores["score_all"] == pytest.approx(
        np.corrcoef([0, 5, 1, 4, 0, 0, 0, 0.5, 0], [0, 9, 2, 0, 1, 0, 0, 0, 1])[0, 1]
    )
    assert scores["score_top"] == pytest.approx(np.corrcoef([0, 5, 1, 4, 0, 0], [0, 9, 2, 0, 1, 0])[0, 1])
    assert scores["score_random"] == pytest.approx(-0.5)
    assert scores["rsquared"] == rsquared(real_top + real_random, sim_top + sim_random)
    assert scores["abs_dev_explained"] == absolute_dev_explained(real_top + real_random, sim_top + sim_random)
    dropped = score_neuron(real_top, sim_top, real_random, sim_random, "drop")
    assert dropped["n_failed_tokens"] == 1
    assert dropped["score_all"] == pytest.approx(
        np.corrcoef([0, 5, 1, 0, 0, 0, 0.5, 0], [0, 9, 2, 1, 0, 0, 0, 1])[0, 1]
    )


def test_vectorised_correlations_agree_with_loop():
    rng = np.random.default_rng(0)
    real = rng.normal(size=(6, 50)) + 3
    sim = 0.5 * real + rng.normal(size=(6, 50))
    sim[1, ::7] = np.nan  # failed tokens, masked per neuron
    sim[2] = 4.0  # constant simulation
    real[3] = -1.0  # constant real
    sim[4, 1:] = np.nan  # a single token left
    got = correlations(real, sim)
    # `correlations` leaves NaN positions out: the "drop" rule
    loop = [correlation([real[i, :20], real[i, 20:]], [sim[i, :20], sim[i, 20:]], "drop") for i in range(6)]
    np.testing.assert_allclose(got, loop, rtol=1e-12)
    assert np.isnan(got[2:5]).all() and np.isfinite(got[[0, 1, 5]]).all()
    keep = ~np.isnan(sim[1])
    assert got[1] == pytest.approx(np.corrcoef(real[1, keep], sim[1, keep])[0, 1])
    assert got[0] == pytest.approx(np.corrcoef(real[0], sim[0])[0, 1])


def _padded(rows: list[list[np.ndarray]]) -> np.ndarray:
    """One row per explanation: its sequences concatenated, then NaN up to the longest row."""
    flat = [np.concatenate(seqs) if seqs else np.zeros(0) for seqs in rows]
    out = np.full((len(flat), max(len(f) for f in flat)), np.nan)
    for row, f in zip(out, flat):
        row[: len(f)] = f
    return out


def _neurons_with_edge_cases(rng):
    """(real_top, sim_top, real_random, sim_random) lists of sequences per explanation: random
    ragged ones with failed tokens, then the cases where the scores are NaN."""
    def sequences(n, length):
        real = [np.abs(rng.normal(size=length)) * rng.integers(0, 2, size=length) for _ in range(n)]
        sim = [r + rng.normal(scale=0.5, size=length) for r in real]
        for s in sim:
            s[rng.random(length) < 0.1] = np.nan
        return real, sim

    neurons = [(*sequences(rng.integers(1, 6), rng.integers(1, 20)),
                *sequences(rng.integers(1, 6), rng.integers(1, 20))) for _ in range(30)]
    neurons += [
        ([np.arange(4.0)], [np.full(4, 2.0)], [np.arange(3.0)], [np.full(3, 2.0)]),  # constant simulation
        ([np.full(4, 3.0)], [np.arange(4.0)], [np.full(2, 3.0)], [np.array([1.0, 5.0])]),  # constant real
        ([np.arange(4.0)], [np.full(4, np.nan)], [np.arange(3.0)], [np.full(3, np.nan)]),  # every token failed
        ([np.zeros(4)], [np.arange(4.0)], [np.zeros(2)], [np.ones(2)]),  # mean(r^2) = mean|r| = 0
        ([np.array([0.0, 0.0, 5.0])], [np.array([1.0, 2.0, np.nan])], [], []),  # real nonzero only where failed
        ([], [], [np.arange(5.0)], [np.arange(5.0) ** 2]),  # no top sequences
        ([np.array([2.0])], [np.array([1.0])], [np.array([0.0, 1.0])], [np.array([0.0, 3.0])]),  # one top token
        ([np.ones(4)] * 3, [np.ones(4)] * 3, [np.arange(4.0)], [np.array([0.0, np.nan, np.nan, 1.0])]),  # 2 kept
    ]
    return neurons


@pytest.mark.parametrize("rows_per_block,failed_tokens", [(5, "zero"), (256, "zero"), (5, "drop")])
def test_vectorised_scores_equal_score_neuron_row_by_row(rows_per_block, failed_tokens, monkeypatch):
    monkeypatch.setattr(scoring, "ROWS_PER_BLOCK", rows_per_block)
    neurons = _neurons_with_edge_cases(np.random.default_rng(1))
    # every third explanation calibrated, the others not (NaN)
    calibration = np.full((len(neurons), 2), np.nan)
    calibration[::3] = np.random.default_rng(4).uniform(-1, 2, size=(len(calibration[::3]), 2))
    got = score_neurons(*(_padded([n[k] for n in neurons]) for k in range(4)), failed_tokens, calibration)
    expected = [score_neuron(*n, failed_tokens, None if np.isnan(c[0]) else tuple(c))
                for n, c in zip(neurons, calibration)]
    assert set(got) == set(expected[0])
    for key, values in got.items():
        assert values.shape == (len(neurons),)
        np.testing.assert_allclose(values, [e[key] for e in expected], rtol=1e-12, atol=0, equal_nan=True, err_msg=key)
    assert got["n_failed_tokens"].dtype.kind == "i"
    assert np.isfinite(got["score_all"][:30]).all() and got["n_failed_tokens"][:30].sum() > 0
    assert np.isnan(got["score_all"][30:34]).all() and np.isnan(got["score_top"][35])
    # no scale (mean(r^2) = 0) is NaN under both rules; failed tokens are NaN only when dropped
    assert np.isnan(got["rsquared"][33]) and np.isnan(got["abs_dev_explained"][33])
    assert np.isnan(got["rsquared"][[32, 34]]).all() == (failed_tokens == "drop")
    assert got["n_failed_tokens"][32] == 7 and got["n_failed_tokens"][35] == 0  # padding is not a failure


def test_vectorised_scores_are_bitwise_equal_on_full_rows():
    """Without failed tokens or padding, each row sums the same values in the same order as the
    per-neuron functions: complete groups score exactly as `score_neuron` scored them."""
    rng = np.random.default_rng(2)
    real = rng.normal(size=(20, 2, 5, 64)).astype(np.float32)
    sim = (real + rng.normal(size=real.shape)).astype(np.float32)
    got = score_neurons(real[:, 0].reshape(20, -1), sim[:, 0].reshape(20, -1),
                        real[:, 1].reshape(20, -1), sim[:, 1].reshape(20, -1))
    for i in range(20):
        expected = score_neuron(list(real[i, 0]), list(sim[i, 0]), list(real[i, 1]), list(sim[i, 1]))
        assert {key: values[i] for key, values in got.items()} == expected


def test_vectorised_scores_of_no_explanations_are_empty():
    got = score_neurons(*(np.zeros((0, 0)) for _ in range(4)))
    assert all(values.shape == (0,) for values in got.values())
