"""A shard's records and tokens as plain data: what the stages read from the tables."""

import hashlib

import numpy as np
import polars as pl


def records_of(records: pl.DataFrame, neurons: list[int]) -> dict[int, dict[str, list[tuple[int, np.ndarray]]]]:
    """{neuron: {kind: [(seq_id, activations), ...] in rank order}} for the given neurons."""
    out: dict[int, dict[str, list]] = {n: {} for n in neurons}
    rows = records.filter(pl.col("unit").is_in(neurons)).sort("unit", "kind", "rank")
    for neuron, kind, seq_id, acts in rows.select("unit", "kind", "seq_id", "activations").iter_rows():
        out[neuron].setdefault(kind, []).append((seq_id, np.asarray(acts, dtype=np.float32)))
    return out


def max_activation(records: list[tuple[int, np.ndarray]]) -> float:
    """The largest activation in `records` (a neuron's top records: its max over the corpus)."""
    return max(float(acts.max()) for _, acts in records)


def records_hash(records: list[tuple[int, np.ndarray]]) -> str:
    """sha256 (16 hex digits) of the records' sequence ids and activations, in order."""
    digest = hashlib.sha256()
    for seq_id, acts in records:
        digest.update(str(seq_id).encode())
        digest.update(np.ascontiguousarray(acts, dtype=np.float32).tobytes())
    return digest.hexdigest()[:16]


def tokens_by_seq(corpus_tokens: pl.DataFrame) -> dict[int, list[str]]:
    return dict(zip(corpus_tokens["seq_id"].to_list(), corpus_tokens["tokens"].to_list()))
