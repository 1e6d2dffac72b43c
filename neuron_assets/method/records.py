"""Activation records: which windows of the corpus to show for each neuron, and its statistics.

A record is one window of `seq_len` tokens with one neuron's activations on it. Per neuron we
keep the top windows by window maximum, a uniform random sample of windows, random windows
bucketed by activation quantile, and the moments of the activation over every token seen.
Everything is streaming, so memory does not grow with the corpus.
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
      (numerically stable, unlike raw power sums).
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

    def update(self, acts: np.ndarray, seq_ids: np.ndarray) -> None:
        """Add a batch: acts float32 [B, T, N] (B windows of T tokens), seq_ids int [B]."""
        acts = np.asarray(acts, dtype=np.float32)
        seq_ids = np.asarray(seq_ids, dtype=np.int64)
        expected = (self.seq_len, self.n_neurons)
        if acts.ndim != 3 or acts.shape[1:] != expected or seq_ids.shape != acts.shape[:1]:
            raise ValueError(
                f"expected acts [B, {self.seq_len}, {self.n_neurons}] and seq_ids [B], "
                f"got {acts.shape} and {seq_ids.shape}"
            )
        if len(acts) == 0:
            return
        window_max = acts.max(axis=1)  # [B, N]
        self._update_top(acts, seq_ids, window_max)
        n_seen = self.n_windows + np.arange(len(acts))
        for b, neurons, slots in _reservoir_writes(self.pool_rng, n_seen, self.quantile_pool, self.n_neurons):
            self.pool_seq[neurons, slots] = seq_ids[b]
            self.pool_acts[neurons, slots] = acts[b][:, neurons].T
        for b, neurons, slots in _reservoir_writes(self.maxima_rng, n_seen, self.n_maxima, self.n_neurons):
            self.maxima[neurons, slots] = window_max[b, neurons]
        self._update_moments(acts.reshape(-1, self.n_neurons))
        self.max = np.maximum(self.max, window_max.max(axis=0))
        self.n_windows += len(acts)

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
        """Pebay (2008) merge of central moment sums M_p = sum (x - mean)^p, with
        delta = mean_b - mean_a and n = n_a + n_b:
        M2 = M2a + M2b + delta^2 n_a n_b / n
        M3 = M3a + M3b + delta^3 n_a n_b (n_a - n_b) / n^2 + 3 delta (n_a M2b - n_b M2a) / n
        M4 = M4a + M4b + delta^4 n_a n_b (n_a^2 - n_a n_b + n_b^2) / n^3
             + 6 delta^2 (n_a^2 M2b + n_b^2 M2a) / n^2 + 4 delta (n_a M3b - n_b M3a) / n
        A batch is summed in float32 (the activations' precision) around c, its float32 mean;
        with S_p = sum (x - c)^p and e = S_1 / n_b, mean_b = c + e and the central sums are
        M2b = S2 - n_b e^2, M3b = S3 - 3 e S2 + 2 n_b e^3, M4b = S4 - 4 e S3 + 6 e^2 S2 - 3 n_b e^4.
        The merge is float64.
        """
        na, nb = float(self.n_windows * self.seq_len), float(len(x))
        n = na + nb
        c = x.sum(axis=0) / np.float32(nb)
        d = x - c
        e = d.sum(axis=0).astype(np.float64) / nb
        d2 = np.square(d)
        s2 = d2.sum(axis=0).astype(np.float64)
        d *= d2
        s3 = d.sum(axis=0).astype(np.float64)
        np.square(d2, out=d2)
        s4 = d2.sum(axis=0).astype(np.float64)
        mean_b = c.astype(np.float64) + e
        m2b = s2 - nb * e**2
        m3b = s3 - 3 * e * s2 + 2 * nb * e**3
        m4b = s4 - 4 * e * s3 + 6 * e**2 * s2 - 3 * nb * e**4
        m2a, m3a, m4a = self.m2, self.m3, self.m4
        delta = mean_b - self.mean
        self.mean = self.mean + delta * nb / n
        self.m2 = m2a + m2b + delta**2 * na * nb / n
        self.m3 = (
            m3a + m3b + delta**3 * na * nb * (na - nb) / n**2 + 3 * delta * (na * m2b - nb * m2a) / n
        )
        self.m4 = (
            m4a
            + m4b
            + delta**4 * na * nb * (na * na - na * nb + nb * nb) / n**3
            + 6 * delta**2 * (na * na * m2b + nb * nb * m2a) / n**2
            + 4 * delta * (na * m3b - nb * m3a) / n
        )
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
            "neuron": neuron[order],
            "kind": np.array(kinds)[kind[order]],
            "rank": rank[order],
            "seq_id": seq[order],
            "activations": acts[order].reshape(-1, T),
        }
        return records, self._stats(boundaries)

    def _stats(self, boundaries):
        N, n = self.n_neurons, self.n_windows * self.seq_len
        empty = np.full(N, np.nan)
        constant = self.max == self.min
        with np.errstate(divide="ignore", invalid="ignore"):
            variance = np.where(constant, 0.0, self.m2 / n) if n else empty
            skewness = np.where(constant, np.nan, self.m3 / n / variance**1.5) if n else empty
            kurtosis = np.where(constant, np.nan, self.m4 / n / variance**2 - 3.0) if n else empty
        return {
            "neuron": list(range(N)),
            "mean": (self.mean if n else empty).tolist(),
            "variance": variance.tolist(),
            "skewness": skewness.tolist(),
            "kurtosis": kurtosis.tolist(),
            "max": (self.max if n else empty).tolist(),
            "n_tokens": [n] * N,
            "quantile_boundaries": boundaries.tolist(),
        }


def _reservoir_writes(rng, n_seen, size, n_neurons):
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
