import numpy as np
import pytest

from neuron_assets.method.records import (
    HARD_NEGATIVE,
    MAX_SEARCH_WINDOWS,
    SPLITS_RANDOM,
    SPLITS_TOP,
    HardNegativeCollector,
    RecordSampler,
    add_records,
    hard_negative_candidates,
    hard_negative_collector,
    inverted_index,
    pick_hard_negatives,
    search_sample,
    search_size,
    split_random,
    split_top,
    top_arrays,
    top_tokens,
)

KINDS = ["top", "random"] + [f"quantile_{q}" for q in range(5)]


def make_data(n_windows=60, T=6, N=5, seed=1):
    rng = np.random.default_rng(seed)
    # rounded values give many tied window maxima, to exercise the tie rule
    acts = np.round(rng.normal(size=(n_windows, T, N)) * 2, 0).astype(np.float32)
    return acts, np.arange(100, 100 + n_windows)


def feed(sampler, acts, seq_ids, batch_sizes):
    start = 0
    for b in batch_sizes:
        sampler.update(acts[start : start + b], seq_ids[start : start + b])
        start += b
    assert start == len(acts)


def rows(records, neuron, kind):
    idx = [i for i, (n, k) in enumerate(zip(records["unit"], records["kind"])) if n == neuron and k == kind]
    return [records["rank"][i] for i in idx], [records["seq_id"][i] for i in idx], [records["activations"][i] for i in idx]


def test_top_k_matches_brute_force_over_several_updates():
    acts, seq_ids = make_data()
    # shuffled seq ids: the tie rule must use seq_id, not arrival order
    seq_ids = np.random.default_rng(5).permutation(seq_ids)
    sampler = RecordSampler(n_neurons=5, seq_len=6, n_top=7, n_random=3, quantile_pool=8)
    feed(sampler, acts, seq_ids, [1, 13, 20, 26])
    records, _ = sampler.finalize()
    for n in range(5):
        maxima = acts[:, :, n].max(axis=1)
        expected = sorted(range(len(acts)), key=lambda i: (-maxima[i], seq_ids[i]))[:7]
        ranks, seqs, arrays = rows(records, n, "top")
        assert ranks == list(range(7))
        assert seqs == [int(seq_ids[i]) for i in expected]
        for i, a in zip(expected, arrays):
            np.testing.assert_array_equal(a, acts[i, :, n])
            assert a.dtype == np.float32 and a.shape == (6,)


def test_tie_at_the_kth_max_goes_to_the_earlier_seq_id_across_updates():
    sampler = RecordSampler(n_neurons=1, seq_len=2, n_top=2, n_random=1, quantile_pool=2)
    sampler.update(np.array([[[3.0], [0.0]], [[1.0], [0.0]]], np.float32), np.array([5, 6]))
    sampler.update(np.array([[[0.0], [1.0]]], np.float32), np.array([1]))
    records, _ = sampler.finalize()
    assert rows(records, 0, "top")[1] == [5, 1]


def test_every_record_holds_the_activations_of_its_window():
    acts, seq_ids = make_data()
    sampler = RecordSampler(n_neurons=5, seq_len=6, n_top=4, n_random=5, quantile_pool=12, per_quantile=2, n_maxima=16)
    feed(sampler, acts, seq_ids, [30, 30])
    records, _ = sampler.finalize()
    by_seq = {int(s): i for i, s in enumerate(seq_ids)}
    for n, s, a in zip(records["unit"], records["seq_id"], records["activations"]):
        np.testing.assert_array_equal(a, acts[by_seq[s], :, n])


def test_row_order_kinds_and_counts():
    acts, seq_ids = make_data()
    sampler = RecordSampler(n_neurons=5, seq_len=6, n_top=4, n_random=5, quantile_pool=12, per_quantile=2)
    feed(sampler, acts, seq_ids, [60])
    records, _ = sampler.finalize()
    keys = [(n, KINDS.index(k), r) for n, k, r in zip(records["unit"], records["kind"], records["rank"])]
    assert keys == sorted(keys)
    assert set(records["kind"]) <= set(KINDS)
    for n in range(5):
        assert len(rows(records, n, "top")[0]) == 4
        ranks, seqs, _ = rows(records, n, "random")
        assert ranks == list(range(5)) and len(set(seqs)) == 5
        for q in range(5):
            assert len(rows(records, n, f"quantile_{q}")[0]) <= 2


def test_quantile_buckets_follow_boundaries():
    acts, seq_ids = make_data(n_windows=40)
    # n_maxima > windows: the maxima reservoir holds every window, so boundaries are exact
    sampler = RecordSampler(n_neurons=5, seq_len=6, n_top=3, n_random=3, quantile_pool=40, per_quantile=40, n_maxima=64)
    feed(sampler, acts, seq_ids, [15, 25])
    records, stats = sampler.finalize()
    for n in range(5):
        maxima = acts[:, :, n].max(axis=1)
        boundaries = np.asarray(stats["quantile_boundaries"][n])
        np.testing.assert_allclose(boundaries, np.quantile(maxima, [0.5, 0.9, 0.99, 0.999]), rtol=1e-6)
        total = 0
        for q in range(5):
            _, _, arrays = rows(records, n, f"quantile_{q}")
            total += len(arrays)
            for a in arrays:
                assert (boundaries <= a.max()).sum() == q
        assert total == 40  # pool = all windows, per_quantile large: every window in one bucket


def test_fewer_windows_than_requested_keeps_what_there_is():
    acts, seq_ids = make_data(n_windows=3)
    sampler = RecordSampler(n_neurons=5, seq_len=6)
    sampler.update(acts, seq_ids)
    records, stats = sampler.finalize()
    assert len(rows(records, 0, "top")[0]) == 3
    assert sorted(rows(records, 0, "random")[1]) == sorted(seq_ids.tolist())
    assert stats["n_tokens"] == [18] * 5


def test_empty_sampler_finalizes_to_no_records_and_nan_stats():
    records, stats = RecordSampler(n_neurons=2, seq_len=4).finalize()
    assert len(records["unit"]) == 0 and records["activations"].shape == (0, 4)
    assert np.isnan(stats["mean"]).all() and stats["n_tokens"] == [0, 0]


def sampled_random_records(seed, batch_sizes, n_neurons=4):
    acts, seq_ids = make_data(n_windows=50, N=n_neurons)
    sampler = RecordSampler(n_neurons=n_neurons, seq_len=6, n_top=2, n_random=5, quantile_pool=10, seed=seed)
    feed(sampler, acts, seq_ids, batch_sizes)
    records, _ = sampler.finalize()
    return [rows(records, n, "random")[1] for n in range(n_neurons)]


def test_reservoir_is_seeded_and_independent_of_batching():
    a = sampled_random_records(0, [50])
    assert a == sampled_random_records(0, [50])
    assert a == sampled_random_records(0, [7, 3, 40])
    assert a != sampled_random_records(1, [50])
    assert a[0] != a[1]  # neurons draw independently


def test_reservoir_is_roughly_uniform():
    n_neurons, n_windows, pool, n_random = 2000, 100, 10, 4
    sampler = RecordSampler(n_neurons=n_neurons, seq_len=2, n_top=1, n_random=n_random, quantile_pool=pool, n_maxima=4)
    acts = np.zeros((n_windows, 2, n_neurons), np.float32)
    feed(sampler, acts, np.arange(n_windows), [25] * 4)
    records, _ = sampler.finalize()
    counts = np.bincount([s for s, k in zip(records["seq_id"], records["kind"]) if k == "random"], minlength=n_windows)
    # each window is a neuron's random record with probability 4/100: 80 expected, sd ~8.8;
    # an unshuffled pool would give the first windows ~200 (they sit in the first slots)
    assert counts.sum() == n_neurons * n_random
    assert np.abs(counts - 80).max() < 40
    assert abs(counts[:50].sum() - counts[50:].sum()) < 300


def test_stats_match_numpy_on_concatenated_data():
    rng = np.random.default_rng(3)
    N = 4
    acts = (50 + rng.gamma(2.0, 3.0, size=(30, 8, N))).astype(np.float32)  # skewed, far from 0
    acts[:, :, 3] = 1.5  # constant neuron
    sampler = RecordSampler(n_neurons=N, seq_len=8)
    feed(sampler, acts, np.arange(30), [4, 11, 15])
    _, stats = sampler.finalize()
    x = acts.transpose(2, 0, 1).reshape(N, -1).astype(np.float64)
    d = x - x.mean(axis=1, keepdims=True)
    var = (d**2).mean(axis=1)
    np.testing.assert_allclose(stats["mean"], x.mean(axis=1), rtol=1e-12)
    np.testing.assert_allclose(stats["variance"], var, rtol=1e-6)  # float32 batch sums
    d, var = d[:3], var[:3]  # moments of the non-constant neurons
    np.testing.assert_allclose(stats["skewness"][:3], (d**3).mean(axis=1) / var**1.5, rtol=1e-5)
    np.testing.assert_allclose(stats["kurtosis"][:3], (d**4).mean(axis=1) / var**2 - 3, rtol=1e-5)
    np.testing.assert_allclose(stats["max_activation"], x.max(axis=1))
    assert stats["variance"][3] == 0.0
    assert np.isnan(stats["skewness"][3]) and np.isnan(stats["kurtosis"][3])
    assert stats["n_tokens"] == [240] * N and stats["unit"] == list(range(N))


def state_bytes(sampler):
    return {k: v.nbytes for k, v in vars(sampler).items() if isinstance(v, np.ndarray)}


def test_memory_does_not_grow_with_updates():
    acts, seq_ids = make_data(n_windows=60)
    sampler = RecordSampler(n_neurons=5, seq_len=6, n_top=4, n_random=3, quantile_pool=5, n_maxima=8)
    sampler.update(acts[:2], seq_ids[:2])
    first = state_bytes(sampler)
    for start in range(2, 60, 2):
        sampler.update(acts[start : start + 2], seq_ids[start : start + 2])
    assert state_bytes(sampler) == first


def test_update_rejects_wrong_shapes():
    sampler = RecordSampler(n_neurons=3, seq_len=4)
    with pytest.raises(ValueError, match=r"\[B, 4, 3\]"):
        sampler.update(np.zeros((2, 4, 5), np.float32), np.arange(2))


def test_split_top_exact_indices():
    splits = split_top(list(range(40)))
    assert tuple(splits) == SPLITS_TOP
    assert splits["train"] == [0, 4, 8, 12, 16]
    assert splits["calibration"] == [1, 5, 9, 13, 17]
    assert splits["valid"] == [2, 6, 10, 14, 18]
    assert splits["test"] == [3, 7, 11, 15, 19]
    assert split_top(list(range(8)), n_per_split=2)["valid"] == [2, 6]


def test_split_random_exact_indices():
    splits = split_random(list(range(20)))
    assert tuple(splits) == SPLITS_RANDOM
    assert splits["calibration"] == [0, 3, 6, 9, 12]
    assert splits["valid"] == [1, 4, 7, 10, 13]
    assert splits["test"] == [2, 5, 8, 11, 14]


def test_splits_refuse_too_few_records():
    with pytest.raises(ValueError, match="need at least 20 .* got 19"):
        split_top(list(range(19)))
    with pytest.raises(ValueError, match="need at least 15 .* got 14"):
        split_random(list(range(14)))
    assert len(split_top(list(range(20)))["test"]) == 5


# hard negatives


def test_top_tokens_are_read_at_the_argmax_of_each_top_record():
    token_ids = np.array([[7, 8, 9], [8, 7, 5], [6, 9, 4], [5, 5, 5]])
    top_seq = np.array([[0, 1, 2, 3], [3, 2, 1, 0]])
    top_acts = np.zeros((2, 4, 3), np.float32)
    # neuron 0 peaks at positions 1, 0, 1, 2 -> tokens 8, 8, 9, 5: 8 twice, then 9 (rank 2) before 5 (rank 3)
    for k, pos in enumerate([1, 0, 1, 2]):
        top_acts[0, k, pos] = 4.0 - k
    # neuron 1 never activates: no top tokens
    top_acts[1] = -1.0
    assert top_tokens(top_seq, top_acts, token_ids) == [[8, 9, 5], []]
    assert top_tokens(top_seq, top_acts, token_ids, n_tokens=2) == [[8, 9], []]
    # a tie in counts goes to the token of the higher-ranked record
    tied = np.zeros((1, 2, 3), np.float32)
    tied[0, 0, 2], tied[0, 1, 0] = 2.0, 1.0  # tokens 9 (rank 0) and 8 (rank 1), once each
    assert top_tokens(np.array([[0, 1]]), tied, token_ids) == [[9, 8]]
    assert top_tokens(np.zeros((2, 0), np.int64), np.zeros((2, 0, 3)), token_ids) == [[], []]


def test_inverted_index_lists_each_window_once_per_token():
    token_ids = np.array([[3, 1, 3], [1, 2, 2], [0, 3, 0]])
    tokens, windows = inverted_index(token_ids)
    assert list(zip(tokens.tolist(), windows.tolist())) == [(0, 2), (1, 0), (1, 1), (2, 1), (3, 0), (3, 2)]


def test_candidates_hold_a_top_token_and_exclude_top_windows():
    rng = np.random.default_rng(0)
    token_ids = rng.integers(0, 50, size=(500, 8))
    tokens = [[3, 7], [11], [], [49]]
    exclude = [np.flatnonzero((token_ids == 3).any(axis=1))[:5], np.array([], np.int64), np.array([1, 2]), []]
    out = hard_negative_candidates(token_ids, tokens, exclude, per_neuron=40, seed=1)
    assert len(out) == 4 and len(out[2]) == 0
    for cands, toks, excl in zip(out, tokens, exclude):
        assert cands.dtype == np.int64 and len(set(cands.tolist())) == len(cands)
        assert all(np.isin(token_ids[c], toks).any() for c in cands)
        assert not set(cands.tolist()) & set(np.asarray(excl).tolist())
    # few eligible windows: all of them, in a random order
    rare = np.zeros((30, 4), np.int64)
    rare[[4, 9, 17], 2] = 5
    few = hard_negative_candidates(rare, [[5]], [[9]], per_neuron=40, seed=0)[0]
    assert sorted(few.tolist()) == [4, 17]
    # many: exactly per_neuron, drawn from all eligible windows
    many = hard_negative_candidates(np.zeros((1000, 4), np.int64), [[0]], [[]], per_neuron=40, seed=0)[0]
    assert len(many) == 40 and many.max() > 500 and many.tolist() != sorted(many.tolist())


def test_candidates_are_seeded():
    token_ids = np.random.default_rng(2).integers(0, 20, size=(3000, 8))
    tokens, exclude = [[1, 2], [3]], [[], []]

    def run(seed, **kw):
        return [c.tolist() for c in hard_negative_candidates(token_ids, tokens, exclude, 40, seed, **kw)]

    assert run(0) == run(0)
    assert run(0) != run(1)
    assert run(0)[0] != run(0)[1]
    # the window sample has its own seed: the layers of a run share one sample
    assert run(0, max_windows=100, sample_seed=9) == run(0, max_windows=100, sample_seed=9)
    assert run(0, max_windows=100, sample_seed=9) != run(0, max_windows=100, sample_seed=8)


def test_candidates_come_from_a_capped_window_sample():
    token_ids = np.zeros((50_000, 4), np.int64)  # every window holds token 0
    sample = search_sample(50_000, seed=3)
    assert len(sample) == MAX_SEARCH_WINDOWS == 20_000 and np.all(np.diff(sample) > 0)
    assert sample.max() > 40_000  # spread over the corpus, not its first windows
    assert np.array_equal(search_sample(500, seed=3), np.arange(500))
    out = hard_negative_candidates(token_ids, [[0]] * 30, [[]] * 30, per_neuron=40, seed=0, sample_seed=3)
    assert np.isin(np.concatenate(out), sample).all()
    small = hard_negative_candidates(token_ids, [[0]] * 30, [[]] * 30, per_neuron=40, seed=0, max_windows=60)
    assert len(np.unique(np.concatenate(small))) <= 60


def test_the_second_pass_sees_one_window_in_20_of_a_large_corpus():
    # ceil(W / 20), at least 64, at most 20,000 windows searched
    assert [search_size(w) for w in (10, 64, 512, 1280, 1281, 10_000, 400_000, 10**7)] == \
        [64, 64, 64, 64, 65, 500, 20_000, 20_000]
    token_ids = np.zeros((2_000, 4), np.int64)  # every window holds token 0, the top token of each neuron
    records = {"unit": np.repeat(np.arange(3), 2), "kind": np.zeros(6, np.int64), "rank": np.tile([0, 1], 3),
               "seq_id": np.arange(6), "activations": np.ones((6, 4), np.float32)}
    collector = hard_negative_collector(records, 3, token_ids, seed=0, sample_seed=1)
    assert len(collector.windows()) <= search_size(2_000) == 100  # not the 120 candidates of 3 neurons


def test_pick_keeps_windows_under_a_tenth_of_the_peak_in_candidate_order():
    window_max = np.array(
        [[0.5, 2.0, 0.99, 1.0, -3.0, 0.0, 0.1],  # peak 10: < 1.0 passes, 1.0 does not
         [0.0, 0.0, 0.0, np.nan, np.nan, np.nan, np.nan],  # NaN: no candidate
         [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]],  # peak <= 0: never
        np.float32)
    keep = pick_hard_negatives(window_max, np.array([10.0, 1.0, 0.0]), n=3)
    assert keep.tolist() == [[True, False, True, False, True, False, False],
                             [True, True, True, False, False, False, False],
                             [False] * 7]
    assert pick_hard_negatives(window_max, np.array([10.0, 1.0, 0.0]), n=10)[0].sum() == 5


def test_collector_stores_candidate_activations_in_any_batch_order():
    rng = np.random.default_rng(4)
    acts = rng.normal(size=(30, 5, 2)).astype(np.float32)
    acts[[3, 8, 20, 21], :, 0] *= 0.01  # quiet windows for neuron 0
    candidates = [np.array([20, 3, 12, 8, 21]), np.array([7, 3])]
    collector = HardNegativeCollector(candidates, np.array([10.0, 0.0]), seq_len=5, n_hard=2)
    assert collector.windows().tolist() == [3, 7, 8, 12, 20, 21]
    union = collector.windows()
    for part in (union[4:], union[:1], union[1:4]):  # any batching, any order of batches
        collector.update(acts[part], part)
    records = collector.finalize()
    assert records["kind"].tolist() == [HARD_NEGATIVE] * 2
    assert records["unit"].tolist() == [0, 0] and records["rank"].tolist() == [0, 1]
    assert records["seq_id"].tolist() == [20, 3]  # the first quiet candidates, in candidate order
    np.testing.assert_array_equal(records["activations"], acts[[20, 3], :, 0])


def test_hard_negatives_join_the_records_after_the_sampler_kinds():
    acts, seq_ids = make_data(n_windows=40, N=3)
    seq_ids = np.arange(40)
    token_ids = np.random.default_rng(0).integers(0, 4, size=(40, 6))
    sampler = RecordSampler(n_neurons=3, seq_len=6, n_top=4, n_random=3, quantile_pool=6)
    feed(sampler, acts, seq_ids, [40])
    records, _ = sampler.finalize()
    collector = hard_negative_collector(records, 3, token_ids, seed=0, sample_seed=0, n_hard=2)
    collector.update(acts[collector.windows()], collector.windows())
    hard = collector.finalize()
    assert len(hard["unit"]) >= 1
    merged = add_records(records, hard)
    order = KINDS + [HARD_NEGATIVE]
    keys = [(n, order.index(k), r) for n, k, r in zip(merged["unit"], merged["kind"], merged["rank"])]
    assert keys == sorted(keys) and len(keys) == len(records["unit"]) + len(hard["unit"])
    top_seq, top_acts = top_arrays(records, 3)
    tokens = top_tokens(top_seq, top_acts, token_ids)
    for n, k, s, a in zip(merged["unit"], merged["kind"], merged["seq_id"], merged["activations"]):
        np.testing.assert_array_equal(a, acts[s, :, n])
        if k == HARD_NEGATIVE:
            assert np.isin(token_ids[s], tokens[n]).any() and s not in top_seq[n]
            assert a.max() < 0.1 * top_acts[n].max()


def test_activation_frequency_is_the_exact_share_of_tokens_above_zero_over_every_batch():
    """Two batches of two windows of three tokens, more windows than the pool holds: the count is
    exact all the same. Neuron 0 is above 0 on 4 of 12 tokens (0 itself does not count), neuron 1
    never (dead), neuron 2 always."""
    first = np.zeros((2, 3, 3), np.float32)
    first[:, :, 0] = [[0.5, 0, -1], [0, 2, 0]]
    second = np.zeros((2, 3, 3), np.float32)
    second[:, :, 0] = [[0, 0, 1e-6], [3, 0, 0]]
    first[:, :, 1] = second[:, :, 1] = -0.25
    first[:, :, 2] = second[:, :, 2] = 0.1
    sampler = RecordSampler(3, 3, n_top=1, n_random=1, quantile_pool=1, n_maxima=2)
    sampler.update(first, np.arange(2))
    sampler.update(second, np.arange(2, 4))
    stats = sampler.finalize()[1]
    assert stats["activation_frequency"] == [4 / 12, 0.0, 1.0]
    assert np.isnan(RecordSampler(2, 3).finalize()[1]["activation_frequency"]).all()  # no tokens: unknown
