"""Activation records: which windows of the corpus to show for each neuron, and its statistics.

A record is one window of `seq_len` tokens with one neuron's activations on it. Per neuron we
keep the top windows by window maximum, a uniform random sample of windows, random windows
bucketed by activation quantile, and the moments of the activation over every token seen.
Everything is streaming, so memory does not grow with the corpus.

Hard negatives (kind hard_negative) take a second, bounded pass: windows that hold one of a
neuron's top tokens (the tokens at the peaks of its top records) but whose max stays under 10% of
its peak, so the explainer's 0-10 display shows them as silent. Candidates come from a seeded sample
of at most 20,000 windows, so index and second pass stay bounded whatever the corpus size.
"""

import numpy as np

SPLITS_TOP = ("train", "calibration", "valid", "test")
SPLITS_RANDOM = ("calibration", "valid", "test")


class RecordSampler:
    """Streaming per-neuron record sampler for one layer.

    Call `update` with batches of windows, then `finalize`. State is a fixed set of arrays:
    4 * N * T * (n_top + quantile_pool) bytes of activations plus 4 * N * n_maxima bytes of
    window maxima and O(N) moments, whatever the number of windows.

    - top: the n_top windows with the highest window max, ties to the earlier seq_id. If fewer
      than n_top windows were seen, all of them are kept (fewer rows, no padding).
    - random: per neuron, Algorithm R keeps a uniform sample of `quantile_pool` windows; the
      pool is shuffled at finalize and its first n_random windows are the random records.
    - quantile_q: the same pool, bucketed by window max against boundaries at `quantiles` of the
      window maxima (q = number of boundaries <= max), at most per_quantile per bucket. These
      overlap with the random records by construction, and as the pool is small the buckets
      above the 0.99 quantile are usually empty.
    - stats: mean, population variance, skewness m3 / m2^1.5 and excess kurtosis
      m4 / m2^2 - 3 over all tokens, merged batch by batch with Pebay's pairwise formulas
      (numerically stable, unlike raw power sums); max_activation, the max over all tokens;
      active_share, the share of tokens at or above 10% of max_activation (those the explainer's
      0-10 scale shows as 1 or more; 0 when max_activation <= 0). The threshold is known only once
      every token was seen, so the share is counted over the tokens of the pool: a uniform sample
      of windows of T tokens each, hence an unbiased estimate (exact when the pool holds every
      window), resolution 1 / (quantile_pool * T); activation_frequency, the share of all tokens on
      which the neuron is above 0 (exact: a count kept batch by batch; 0 for a dead neuron).
    """

    def __init__(
        self,
        n_neurons: int,
        seq_len: int,
        n_top: int = 40,
        n_random: int = 20,
        quantile_pool: int = 50,
        per_quantile: int = 5,
        n_maxima: int = 1024,
        quantiles=(0.5, 0.9, 0.99, 0.999),
        seed: int = 0,
    ):
        if n_random > quantile_pool:
            raise ValueError(f"n_random ({n_random}) must not exceed quantile_pool ({quantile_pool})")
        self.n_neurons, self.seq_len = n_neurons, seq_len
        self.n_top, self.n_random, self.quantile_pool = n_top, n_random, quantile_pool
        self.per_quantile, self.n_maxima = per_quantile, n_maxima
        self.quantiles = tuple(float(q) for q in quantiles)
        self.seed = seed
        # one stream per reservoir, so a batch's draws are those of its windows in order
        self.pool_rng, self.maxima_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(2))
        self.n_windows = 0
        N, T = n_neurons, seq_len
        # neuron-major; empty top slots hold -inf so that any real window displaces them
        self.top_max = np.full((N, n_top), -np.inf, np.float32)
        self.top_seq = np.full((N, n_top), np.iinfo(np.int64).max, np.int64)
        self.top_acts = np.zeros((N, n_top, T), np.float32)
        self.pool_seq = np.zeros((N, quantile_pool), np.int64)
        self.pool_acts = np.zeros((N, quantile_pool, T), np.float32)
        self.maxima = np.zeros((N, n_maxima), np.float32)
        self.mean, self.m2, self.m3, self.m4 = (np.zeros(N) for _ in range(4))
        self.max = np.full(N, -np.inf)
        self.min = np.full(N, np.inf)  # max == min detects constant neurons exactly
        self.n_active = np.zeros(N, np.int64)  # tokens above 0

    def update(self, acts: np.ndarray, seq_ids: np.ndarray) -> None:
        """Add a batch: acts float32 [B, T, N] (B windows of T tokens), seq_ids int [B]."""
        acts = np.asarray(acts, dtype=np.float32)
        seq_ids = np.asarray(seq_ids, dtype=np.int64)
        self._check_batch(tuple(acts.shape), seq_ids.shape)
        if len(acts) == 0:
            return
        window_max = acts.max(axis=1)  # [B, N]
        self._update_top(acts, seq_ids, window_max)
        n_seen = self.n_windows + np.arange(len(acts))
        for b, neurons, slots in reservoir_writes(self.pool_rng, n_seen, self.quantile_pool, self.n_neurons):
            self.pool_seq[neurons, slots] = seq_ids[b]
            self.pool_acts[neurons, slots] = acts[b][:, neurons].T
        for b, neurons, slots in reservoir_writes(self.maxima_rng, n_seen, self.n_maxima, self.n_neurons):
            self.maxima[neurons, slots] = window_max[b, neurons]
        self._update_moments(acts.reshape(-1, self.n_neurons))
        self.n_active += np.count_nonzero(acts > 0, axis=(0, 1))
        self.max = np.maximum(self.max, window_max.max(axis=0))
        self.n_windows += len(acts)

    def _check_batch(self, acts_shape: tuple, ids_shape: tuple) -> None:
        if len(acts_shape) != 3 or acts_shape[1:] != (self.seq_len, self.n_neurons) or ids_shape != acts_shape[:1]:
            raise ValueError(f"expected acts [B, {self.seq_len}, {self.n_neurons}] and seq_ids [B], "
                             f"got {acts_shape} and {ids_shape}")

    def _update_top(self, acts, seq_ids, window_max):
        """Merge the batch into the top-k. Slots are unordered (finalize sorts them): a window
        that enters takes the slot of one that leaves, so only entering windows are copied.
        Only neurons with a window reaching their current k-th max can change."""
        k = self.n_top
        batch_max = window_max.T  # [N, B]
        kth = self.top_max.min(axis=1, keepdims=True)  # empty slots hold -inf
        n = np.flatnonzero((batch_max >= kth).any(axis=1))
        if len(n) == 0:
            return
        cand_max = np.concatenate([self.top_max[n], batch_max[n]], axis=1)
        cand_seq = np.concatenate([self.top_seq[n], np.broadcast_to(seq_ids, batch_max[n].shape)], axis=1)
        best = np.lexsort((cand_seq, -cand_max), axis=1)[:, :k]  # max desc, seq_id asc
        kept = np.zeros(cand_max.shape, bool)
        np.put_along_axis(kept, best, True, axis=1)
        # per neuron as many freed slots as entering windows, both listed in row order
        row, slot = np.nonzero(~kept[:, :k])
        _, b = np.nonzero(kept[:, k:])
        neurons = n[row]
        self.top_max[neurons, slot] = batch_max[neurons, b]
        self.top_seq[neurons, slot] = seq_ids[b]
        self.top_acts[neurons, slot] = acts[b, :, neurons]

    def _update_moments(self, x):
        """Merge the moments of a batch x float32 [n_b, N] (`batch_moments`, `merge_moments`): the batch
        is summed in float32 (the activations' precision) around c, its float32 mean; the merge is
        float64."""
        nb = len(x)
        c = x.sum(axis=0) / np.float32(nb)
        d = x - c
        e = d.sum(axis=0).astype(np.float64) / nb
        d2 = np.square(d)
        s2 = d2.sum(axis=0).astype(np.float64)
        d *= d2
        s3 = d.sum(axis=0).astype(np.float64)
        np.square(d2, out=d2)
        s4 = d2.sum(axis=0).astype(np.float64)
        batch = batch_moments(nb, c.astype(np.float64), e, s2, s3, s4)
        na = float(self.n_windows * self.seq_len)
        self.mean, self.m2, self.m3, self.m4 = merge_moments(na, (self.mean, self.m2, self.m3, self.m4), nb, batch)
        self.min = np.minimum(self.min, x.min(axis=0))

    def finalize(self) -> tuple[dict, dict]:
        """(records, stats) as dicts of numpy columns; see the class docstring. Records hold
        neuron, kind (str), rank, seq_id and activations float32 [rows, T]. Does not change state."""
        N, T, Q = self.n_neurons, self.seq_len, len(self.quantiles)
        k = min(self.n_windows, self.n_top)
        n_pool = min(self.n_windows, self.quantile_pool)
        # reservoir slots fill in arrival order: a permutation drawn independently of the data
        # makes any prefix of the pool a uniform sample of it
        shuffle_rng = np.random.default_rng([self.seed, 1])
        order = np.argsort(shuffle_rng.random((N, n_pool)), axis=1)
        pool_seq = np.take_along_axis(self.pool_seq[:, :n_pool], order, axis=1)
        pool_acts = np.take_along_axis(self.pool_acts[:, :n_pool], order[:, :, None], axis=1)
        best = np.lexsort((self.top_seq, -self.top_max), axis=1)[:, :k]  # max desc, seq_id asc
        top_seq = np.take_along_axis(self.top_seq, best, axis=1)
        top_acts = np.take_along_axis(self.top_acts, best[:, :, None], axis=1)

        if self.n_windows:
            n_max = min(self.n_windows, self.n_maxima)
            boundaries = np.quantile(self.maxima[:, :n_max], self.quantiles, axis=1).T  # [N, Q]
        else:
            boundaries = np.full((N, Q), np.nan)
        bucket = (pool_acts.max(axis=2)[:, :, None] >= boundaries[:, None, :]).sum(axis=2)

        blocks = [
            _rows(0, np.ones((N, k), bool), top_seq, top_acts),
            _rows(1, np.broadcast_to(np.arange(n_pool) < self.n_random, (N, n_pool)), pool_seq, pool_acts),
        ]
        for q in range(Q + 1):
            in_q = bucket == q
            keep = in_q & (np.cumsum(in_q, axis=1) <= self.per_quantile)
            blocks.append(_rows(2 + q, keep, pool_seq, pool_acts))
        neuron, kind, rank, seq, acts = (np.concatenate(col) for col in zip(*blocks))
        order = np.lexsort((rank, kind, neuron))
        kinds = ("top", "random", *(f"quantile_{q}" for q in range(Q + 1)))
        records = {
            "unit": neuron[order],
            "kind": np.array(kinds)[kind[order]],
            "rank": rank[order],
            "seq_id": seq[order],
            "activations": acts[order].reshape(-1, T),
        }
        return records, self._stats(boundaries, self.pool_acts[:, :n_pool])

    def _stats(self, boundaries, pool_acts):
        N, n = self.n_neurons, self.n_windows * self.seq_len
        empty = np.full(N, np.nan)
        constant = self.max == self.min
        with np.errstate(divide="ignore", invalid="ignore"):
            variance = np.where(constant, 0.0, self.m2 / n) if n else empty
            skewness = np.where(constant, np.nan, self.m3 / n / variance**1.5) if n else empty
            kurtosis = np.where(constant, np.nan, self.m4 / n / variance**2 - 3.0) if n else empty
        shown = (pool_acts >= HARD_FRACTION * self.max[:, None, None]) & (self.max > 0)[:, None, None]
        active_share = shown.mean(axis=(1, 2)) if n else empty
        return {
            "unit": list(range(N)),
            "mean": (self.mean if n else empty).tolist(),
            "variance": variance.tolist(),
            "skewness": skewness.tolist(),
            "kurtosis": kurtosis.tolist(),
            "max_activation": (self.max if n else empty).tolist(),
            "active_share": active_share.tolist(),
            "activation_frequency": (self.n_active / n if n else empty).tolist(),
            "n_tokens": [n] * N,
            "quantile_boundaries": boundaries.tolist(),
        }


def batch_moments(n, c, e, s2, s3, s4):
    """(mean, M2, M3, M4) of a batch of n values from its sums around a shift c: with
    S_p = sum (x - c)^p and e = S_1 / n, mean = c + e, M2 = S2 - n e^2,
    M3 = S3 - 3 e S2 + 2 n e^3, M4 = S4 - 4 e S3 + 6 e^2 S2 - 3 n e^4.
    Arithmetic only: the arguments may be numpy arrays or tensors of any library."""
    return c + e, s2 - n * e**2, s3 - 3 * e * s2 + 2 * n * e**3, s4 - 4 * e * s3 + 6 * e**2 * s2 - 3 * n * e**4


def merge_moments(na, a, nb, b):
    """Pebay (2008): the (mean, M2, M3, M4) of n = na + nb values from those of its two parts a and b,
    M_p = sum (x - mean)^p, with delta = mean_b - mean_a:
    M2 = M2a + M2b + delta^2 na nb / n
    M3 = M3a + M3b + delta^3 na nb (na - nb) / n^2 + 3 delta (na M2b - nb M2a) / n
    M4 = M4a + M4b + delta^4 na nb (na^2 - na nb + nb^2) / n^3
         + 6 delta^2 (na^2 M2b + nb^2 M2a) / n^2 + 4 delta (na M3b - nb M3a) / n
    Arithmetic only, like `batch_moments`."""
    (mean_a, m2a, m3a, m4a), (mean_b, m2b, m3b, m4b) = a, b
    n = na + nb
    delta = mean_b - mean_a
    return (
        mean_a + delta * nb / n,
        m2a + m2b + delta**2 * na * nb / n,
        m3a + m3b + delta**3 * na * nb * (na - nb) / n**2 + 3 * delta * (na * m2b - nb * m2a) / n,
        m4a + m4b + delta**4 * na * nb * (na * na - na * nb + nb * nb) / n**3
        + 6 * delta**2 * (na * na * m2b + nb * nb * m2a) / n**2 + 4 * delta * (na * m3b - nb * m3a) / n,
    )


# Hard negatives (delphi; docs/method.md, Scores): windows that hold a neuron's top tokens but leave it
# silent. Found after the first pass: candidates from an inverted index of a bounded window sample,
# then a second forward pass over the candidates only.
HARD_NEGATIVE = "hard_negative"
N_HARD = 10  # hard negatives kept per neuron
CANDIDATES_PER_HARD = 4  # candidates searched per hard negative
HARD_FRACTION = 0.1  # the explainer shows anything under 10% of the peak as 0 (also active_share's threshold)
N_TOP_TOKENS = 3
MAX_SEARCH_WINDOWS = 20_000
SEARCH_EVERY = 20  # one window in 20 of the corpus is searched (so run through the second pass), at least...
MIN_SEARCH_WINDOWS = 64  # ...these many, at most MAX_SEARCH_WINDOWS


def top_arrays(records: dict, n_neurons: int) -> tuple[np.ndarray, np.ndarray]:
    """The top records of `RecordSampler.finalize()`'s columns as seq_ids int64 [N, K] and
    activations float32 [N, K, T], in rank order (every neuron has the same K)."""
    top = records["kind"] == "top"
    T = records["activations"].shape[1]
    return records["seq_id"][top].reshape(n_neurons, -1), records["activations"][top].reshape(n_neurons, -1, T)


def top_peaks(top_acts: np.ndarray) -> np.ndarray:
    """Per neuron the max over its top records [N, K, T]; -inf for a neuron without records."""
    top_acts = np.asarray(top_acts)
    if top_acts.shape[1] == 0:
        return np.full(len(top_acts), -np.inf)
    return top_acts.max(axis=(1, 2)).astype(np.float64)


def top_tokens(top_seq_ids: np.ndarray, top_acts: np.ndarray, token_ids: np.ndarray,
               n_tokens: int = N_TOP_TOKENS) -> list[list[int]]:
    """Per neuron, its top tokens: the token at the argmax position of each top record
    (top_seq_ids [N, K] in rank order, top_acts [N, K, T], token_ids [W, T] indexed by seq_id), the
    up to n_tokens most frequent first, ties to the token of the higher-ranked record. A neuron whose
    peak (max over its top records) is <= 0 gets none."""
    top_seq_ids = np.asarray(top_seq_ids, np.int64)
    top_acts = np.asarray(top_acts)
    if top_seq_ids.shape[1] == 0:
        return [[] for _ in range(len(top_seq_ids))]
    at_argmax = np.asarray(token_ids)[top_seq_ids, top_acts.argmax(axis=2)]  # [N, K]
    out = []
    for tokens, peak in zip(at_argmax, top_peaks(top_acts)):
        if not peak > 0:
            out.append([])
            continue
        unique, first, counts = np.unique(tokens, return_index=True, return_counts=True)
        order = np.lexsort((first, -counts))[:n_tokens]  # count desc, first rank asc
        out.append(unique[order].tolist())
    return out


def search_size(n_windows: int) -> int:
    """How many windows are searched for hard-negative candidates:
    min(MAX_SEARCH_WINDOWS, max(MIN_SEARCH_WINDOWS, ceil(n_windows / SEARCH_EVERY))). The second
    forward pass runs over candidates of these windows only, so it costs at most 1/SEARCH_EVERY of
    the first once the corpus has more than SEARCH_EVERY * MIN_SEARCH_WINDOWS windows."""
    return min(MAX_SEARCH_WINDOWS, max(MIN_SEARCH_WINDOWS, -(-n_windows // SEARCH_EVERY)))


def search_sample(n_windows: int, max_windows: int = MAX_SEARCH_WINDOWS, seed: int = 0) -> np.ndarray:
    """Sorted ids of the windows searched for candidates: all of them, or a seeded uniform sample
    of max_windows. The cap bounds the inverted index (8 * max_windows * T bytes, whatever the
    corpus size) and, the sample being shared by the layers of a run, the second pass."""
    if n_windows <= max_windows:
        return np.arange(n_windows, dtype=np.int64)
    return np.sort(np.random.default_rng([seed, 2]).choice(n_windows, max_windows, replace=False))


def inverted_index(token_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(token, window) pairs of token_ids [S, T], one per distinct pair, sorted by token then window:
    the windows holding token t are window[searchsorted(token, t, 'left'):searchsorted(token, t, 'right')]."""
    S = len(token_ids)
    keys = np.unique(np.asarray(token_ids, np.int64) * S + np.arange(S)[:, None])
    return keys // max(S, 1), keys % max(S, 1)


def hard_negative_candidates(token_ids: np.ndarray, tokens_per_neuron: list, exclude_per_neuron: list,
                             per_neuron: int, seed: int, max_windows: int = MAX_SEARCH_WINDOWS,
                             sample_seed: int | None = None) -> list[np.ndarray]:
    """Per neuron, up to per_neuron window ids (int64, a seeded random order) drawn uniformly from the
    windows of `search_sample(len(token_ids), max_windows, sample_seed)` that hold at least one of
    its tokens and are not in its exclude list (its top records). token_ids [W, T] holds the corpus
    windows by id. `seed` draws the candidates; `sample_seed` (default: seed) draws the window sample."""
    sample = search_sample(len(token_ids), max_windows, seed if sample_seed is None else sample_seed)
    index_token, index_position = inverted_index(np.asarray(token_ids)[sample])  # positions in the sample
    rng = np.random.default_rng([seed, 3])
    out = []
    for tokens, exclude in zip(tokens_per_neuron, exclude_per_neuron, strict=True):
        tokens = np.asarray(tokens, np.int64)
        lo = np.searchsorted(index_token, tokens, "left")
        hi = np.searchsorted(index_token, tokens, "right")
        # a mask over the sample, not np.unique of the windows: the same sorted set, 3x faster on a
        # large sample, where a frequent token is in most windows
        held = np.zeros(len(sample), bool)
        for a, b in zip(lo, hi):
            held[index_position[a:b]] = True
        exclude = np.asarray(exclude, np.int64)
        at = np.searchsorted(sample, exclude)
        inside = at < len(sample)
        held[at[inside][sample[at[inside]] == exclude[inside]]] = False
        windows = sample[held]
        if len(windows) > per_neuron:
            out.append(rng.choice(windows, per_neuron, replace=False))
        else:
            out.append(rng.permutation(windows))
    return out


def pick_hard_negatives(window_max: np.ndarray, peaks: np.ndarray, n: int = N_HARD,
                        fraction: float = HARD_FRACTION) -> np.ndarray:
    """keep bool [N, C]: per neuron, in candidate order, the first n candidates whose window max
    (window_max [N, C]; NaN = no candidate) is < fraction * peak. None for a peak <= 0."""
    peaks = np.asarray(peaks, np.float64)[:, None]
    with np.errstate(invalid="ignore"):
        quiet = (np.asarray(window_max) < fraction * peaks) & (peaks > 0)
    return quiet & (np.cumsum(quiet, axis=1) <= n)


class HardNegativeCollector:
    """Second pass for one layer: each neuron's activations on its candidate windows, in candidate
    order; `finalize` picks the hard negatives. State: 4 * N * C * (T + 1) bytes, C = the most
    candidates of a neuron (at most 4 * n_hard), whatever the number of windows."""

    def __init__(self, candidates: list[np.ndarray], peaks: np.ndarray, seq_len: int, n_hard: int = N_HARD,
                 fraction: float = HARD_FRACTION):
        N, C = len(candidates), max((len(c) for c in candidates), default=0)
        self.n_hard, self.fraction, self.seq_len = n_hard, fraction, seq_len
        self.peaks = np.asarray(peaks, np.float64)
        self.seq = np.full((N, C), -1, np.int64)
        for n, c in enumerate(candidates):
            self.seq[n, : len(c)] = c
        self.acts = np.zeros((N, C, seq_len), np.float32)
        self.window_max = np.full((N, C), np.nan, np.float32)  # NaN until seen
        neuron, slot = np.nonzero(self.seq >= 0)
        order = np.argsort(self.seq[neuron, slot], kind="stable")  # slots by window, for range lookups
        self._neuron, self._slot = neuron[order], slot[order]
        self._seq = self.seq[self._neuron, self._slot]

    def windows(self) -> np.ndarray:
        """Sorted ids of every candidate window of the layer."""
        return np.unique(self._seq)

    def update(self, acts: np.ndarray, seq_ids: np.ndarray) -> None:
        """Add a batch of windows of the second pass: acts float32 [B, T, N], seq_ids int [B]."""
        seq_ids = np.asarray(seq_ids, np.int64)
        if len(seq_ids) == 0 or len(self._seq) == 0:
            return
        lo = np.searchsorted(self._seq, seq_ids.min(), "left")
        hi = np.searchsorted(self._seq, seq_ids.max(), "right")
        sorter = np.argsort(seq_ids)
        pos = np.minimum(np.searchsorted(seq_ids, self._seq[lo:hi], sorter=sorter), len(seq_ids) - 1)
        b = sorter[pos]
        hit = seq_ids[b] == self._seq[lo:hi]
        neuron, slot, b = self._neuron[lo:hi][hit], self._slot[lo:hi][hit], b[hit]
        self.acts[neuron, slot] = np.asarray(acts, np.float32)[b, :, neuron]
        self.window_max[neuron, slot] = self.acts[neuron, slot].max(axis=1)

    def finalize(self) -> dict:
        """Rows of kind hard_negative, in `RecordSampler.finalize()`'s column format, rank = order
        among the kept candidates."""
        keep = pick_hard_negatives(self.window_max, self.peaks, self.n_hard, self.fraction)
        neuron, _, rank, seq, acts = _rows(0, keep, self.seq, self.acts)
        return {"unit": neuron, "kind": np.full(len(neuron), HARD_NEGATIVE), "rank": rank, "seq_id": seq,
                "activations": acts.reshape(-1, self.seq_len)}


def hard_negative_collector(records: dict, n_neurons: int, token_ids: np.ndarray, seed: int, sample_seed: int,
                            n_hard: int = N_HARD, max_windows: int | None = None) -> HardNegativeCollector:
    """The second-pass collector of one layer, from its `RecordSampler.finalize()` records: top
    tokens, then up to 4 * n_hard candidates per neuron (not among its top records) from a sample
    of `max_windows` windows (default `search_size`)."""
    max_windows = search_size(len(token_ids)) if max_windows is None else max_windows
    top_seq, top_acts = top_arrays(records, n_neurons)
    tokens = top_tokens(top_seq, top_acts, token_ids)
    candidates = hard_negative_candidates(token_ids, tokens, list(top_seq), CANDIDATES_PER_HARD * n_hard, seed,
                                          max_windows, sample_seed)
    return HardNegativeCollector(candidates, top_peaks(top_acts), token_ids.shape[1], n_hard)


def add_records(records: dict, extra: dict) -> dict:
    """The rows of both, sorted by neuron; within a neuron the rows of `records` come first, so
    extra kinds sort after the sampler's (top, random, quantile_q, then hard_negative)."""
    merged = {k: np.concatenate([records[k], extra[k]]) for k in records}
    order = np.argsort(merged["unit"], kind="stable")
    return {k: v[order] for k, v in merged.items()}


def reservoir_writes(rng, n_seen, size, n_neurons):
    """Algorithm R, one independent reservoir per neuron, for a batch of windows numbered
    n_seen (0-based, ascending): window i fills slot i while the reservoir is not full, else
    replaces slot j ~ U{0..i} if j < size, i.e. enters with probability size / (i + 1).
    Yields (window in batch, neurons, slots) in window order: apply them in that order, so a
    later window wins a slot drawn twice. One draw of the batch's full rows equals the draws
    window by window, so batching changes nothing."""
    full = n_seen >= size
    drawn = iter(rng.integers(0, n_seen[full, None] + 1, size=(int(full.sum()), n_neurons)))
    for b, i in enumerate(n_seen):
        if i < size:
            yield b, slice(None), i
        else:
            slots = next(drawn)
            neurons = np.flatnonzero(slots < size)
            yield b, neurons, slots[neurons]


def _rows(kind, keep, seq, acts):
    """Flat rows for one kind: keep [N, K] marks the kept slots; rank counts kept slots per neuron."""
    neuron, slot = np.nonzero(keep)
    rank = (np.cumsum(keep, axis=1) - 1)[neuron, slot]
    return neuron, np.full(len(neuron), kind), rank, seq[neuron, slot], acts[neuron, slot]


def _deal(records, splits, n_per_split):
    """Round robin: record i goes to splits[i % len(splits)]; each split keeps its first n."""
    records = list(records)
    needed = len(splits) * n_per_split
    if len(records) < needed:
        raise ValueError(
            f"need at least {needed} records ({len(splits)} splits x {n_per_split}), got {len(records)}"
        )
    return {name: records[i :: len(splits)][:n_per_split] for i, name in enumerate(splits)}


def split_top(records: list, n_per_split: int = 5) -> dict[str, list]:
    """Top records dealt into SPLITS_TOP: train = top[0, 4, 8, ...], valid = top[2, 6, 10, ...]."""
    return _deal(records, SPLITS_TOP, n_per_split)


def split_random(records: list, n_per_split: int = 5) -> dict[str, list]:
    """Random records dealt into SPLITS_RANDOM: valid = random[1, 4, 7, 10, 13]."""
    return _deal(records, SPLITS_RANDOM, n_per_split)
