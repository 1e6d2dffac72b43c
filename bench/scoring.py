"""Scoring speed (docs/method.md, Scores): vectorised over neurons vs a per-neuron Python loop, side by side in one run.

On seeded synthetic data shaped as the assets score it: N neurons (explanations) x 10 sequences
(5 top + 5 random) x 64 tokens, real activations (float32, half of them 0, as after an MLP's
activation function) and simulated expected values in [0, 10] (float32) with a few NaN failed tokens:

(a) per-neuron loop: `score_neuron` once per neuron on lists of sequences, as the scores asset
    called it before it was vectorised;
(b) vectorised: one `score_neurons` call on [N, tokens] arrays, what the scores asset calls now;
(c) the scores stage as the asset calls it (`score_units`: polars group_by per (neuron, variant),
    records_hash, cost, then one `score_neurons` call) on synthetic polars frames of the same data,
    to show what share of the asset's time scoring still is.

Prints wall-clock and CPU seconds (best of --repeats) and neurons/s per method, the largest
difference between the methods' scores (and how many agree bit for bit), and the ratio
"vectorised vs per-neuron loop". On a shared machine other processes slow the wall clock down,
much less this process's CPU time, so both are shown, with the load average before and after.

Run: .venv/bin/python bench/scoring.py [--neurons 10000] [--seq-len 64] [--repeats 3] [--seed 0]
"""

import argparse
import os
import platform
import time
from typing import NamedTuple

import numpy as np
import polars as pl

from neuron_assets.method.scoring import score_neuron, score_neurons
from neuron_assets.stages.score import score_units

SCORES = ("score_all", "score_top", "score_random", "rsquared", "abs_dev_explained", "n_failed_tokens")
SEQUENCES_PER_SPLIT = 5
FAILED_TOKEN_SHARE = 0.001


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--neurons", type=int, default=10_000)
    parser.add_argument("--seq-len", type=int, default=64, help="tokens per sequence")
    parser.add_argument("--repeats", type=int, default=3, help="runs per method; the fastest is reported")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


class Timing(NamedTuple):
    """Wall-clock seconds and this process's CPU seconds."""

    wall: float
    cpu: float


def best_of(repeats: int, function, *args) -> tuple[object, Timing]:
    """(result, fastest Timing by wall clock) of `repeats` calls of function(*args)."""
    timings = []
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        result = function(*args)
        timings.append(Timing(time.perf_counter() - wall, time.process_time() - cpu))
    return result, min(timings)


def synthetic(n_neurons: int, seq_len: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """real and simulated, float32 [n_neurons, 2 (top, random), 5, seq_len]."""
    rng = np.random.default_rng(seed)
    shape = (n_neurons, 2, SEQUENCES_PER_SPLIT, seq_len)
    real = np.maximum(rng.normal(size=shape), 0).astype(np.float32)
    quality = rng.uniform(0, 3, size=(n_neurons, 1, 1, 1))  # how well each explanation predicts
    simulated = np.clip(quality * real + rng.exponential(size=shape), 0, 10).astype(np.float32)
    simulated[rng.random(shape) < FAILED_TOKEN_SHARE] = np.nan
    return real, simulated


def per_neuron_loop(real: np.ndarray, simulated: np.ndarray) -> dict[str, np.ndarray]:
    """(a): `score_neuron` per neuron, on lists of one array per sequence."""
    rows = [score_neuron(list(r[0]), list(s[0]), list(r[1]), list(s[1])) for r, s in zip(real, simulated)]
    return {key: np.array([row[key] for row in rows]) for key in SCORES}


def vectorised(real: np.ndarray, simulated: np.ndarray) -> dict[str, np.ndarray]:
    """(b): one `score_neurons` call; each row is a neuron's sequences of one split concatenated."""
    n = len(real)
    return score_neurons(real[:, 0].reshape(n, -1), simulated[:, 0].reshape(n, -1),
                         real[:, 1].reshape(n, -1), simulated[:, 1].reshape(n, -1))


def asset_inputs(real: np.ndarray, simulated: np.ndarray) -> tuple[pl.DataFrame, pl.DataFrame, dict]:
    """The simulations and explanations tables and the neuron records `score_units` reads, one
    explanation (variant "llm") per neuron, sequence ids 0-4 top and 5-9 random."""
    n_neurons = len(real)
    kinds = ["top"] * SEQUENCES_PER_SPLIT + ["random"] * SEQUENCES_PER_SPLIT
    explanation_ids = [f"e{neuron}" for neuron in range(n_neurons)]
    sims = pl.DataFrame({
        "layer": pl.Series([0] * (n_neurons * len(kinds)), dtype=pl.Int32),
        "unit": pl.Series(np.repeat(np.arange(n_neurons), len(kinds)), dtype=pl.Int32),
        "variant": "llm",
        "explanation_id": np.repeat(explanation_ids, len(kinds)),
        "seq_id": pl.Series(np.tile(np.arange(len(kinds)), n_neurons), dtype=pl.Int32),
        "kind": kinds * n_neurons,
        "expected": pl.Series(list(simulated.reshape(n_neurons * len(kinds), -1)), dtype=pl.List(pl.Float32)),
        "simulator_model": "synthetic",
        "method": "all_at_once",
        "cost_usd": 0.0,
        "error": pl.Series([None] * (n_neurons * len(kinds)), dtype=pl.String),
    })
    explanations = pl.DataFrame({"explanation_id": explanation_ids, "text": "synthetic", "cost_usd": 0.0,
                                 "donor_unit": pl.Series([None] * n_neurons, dtype=pl.Int32)})
    records = {neuron: {kind: [(i * SEQUENCES_PER_SPLIT + j, real[neuron, i, j]) for j in range(SEQUENCES_PER_SPLIT)]
                        for i, kind in enumerate(("top", "random"))}
               for neuron in range(n_neurons)}
    return sims, explanations, records


def asset_scores(sims: pl.DataFrame, explanations: pl.DataFrame, records: dict) -> dict[str, np.ndarray]:
    """(c): the scores asset's rows, as arrays over neurons in neuron order."""
    table = score_units(sims, explanations, records)
    return {key: table[key].to_numpy() for key in SCORES}


def compare(name: str, expected: dict[str, np.ndarray], got: dict[str, np.ndarray]) -> str:
    """Largest |difference| over all scores (NaN must match NaN) and the share bit for bit equal."""
    differences, equal, total = [], 0, 0
    for key in expected:
        a, b = expected[key].astype(np.float64), got[key].astype(np.float64)
        if not np.array_equal(np.isnan(a), np.isnan(b)):
            return f"{name}: NaN in different places for {key}: MISMATCH"
        finite = ~np.isnan(a)
        differences.append(np.abs(a[finite] - b[finite]).max(initial=0.0))
        equal += int((a[finite] == b[finite]).sum() + (~finite).sum())
        total += len(a)
    return f"{name}: max |difference| {max(differences):.1e}, {equal}/{total} values bit for bit equal"


def row(method: str, n_neurons: int, timing: Timing) -> str:
    return f"{method:<44} {n_neurons:>8} {timing.wall:>9.3f} {timing.cpu:>9.3f} {n_neurons / timing.wall:>12,.0f}"


def main() -> None:
    args = parse_args()
    real, simulated = synthetic(args.neurons, args.seq_len, args.seed)
    sims, explanations, records = asset_inputs(real, simulated)
    load_before = os.getloadavg()
    looped, loop_time = best_of(args.repeats, per_neuron_loop, real, simulated)
    vector, vector_time = best_of(args.repeats, vectorised, real, simulated)
    asset, asset_time = best_of(args.repeats, asset_scores, sims, explanations, records)
    load_after = os.getloadavg()

    n, tokens = args.neurons, 2 * SEQUENCES_PER_SPLIT * args.seq_len
    print("Scoring speed: vectorised over neurons vs per-neuron Python loop")
    print(f"{n} neurons x {2 * SEQUENCES_PER_SPLIT} sequences ({SEQUENCES_PER_SPLIT} top + {SEQUENCES_PER_SPLIT} "
          f"random) x {args.seq_len} tokens = {tokens} tokens per neuron; "
          f"{int(np.isnan(simulated).sum())} failed (NaN) tokens; seed {args.seed}")
    print(f"numpy {np.__version__}, polars {pl.__version__}; {os.cpu_count()} CPUs ({platform.machine()}); "
          f"best of {args.repeats} runs")
    print(f"load average (1 min) before {load_before[0]:.2f}, after {load_after[0]:.2f}")
    print()
    print(f"{'method':<44} {'neurons':>8} {'wall s':>9} {'cpu s':>9} {'neurons/s':>12}")
    print(row("(a) per-neuron loop, score_neuron", n, loop_time))
    print(row("(b) vectorised, score_neurons", n, vector_time))
    print(row("(c) scores stage, score_units", n, asset_time))
    print()
    print(compare("(a) vs (b)", looped, vector))
    print(compare("(b) vs (c)", vector, asset))
    print()
    print(f"vectorised vs per-neuron loop: {loop_time.wall / vector_time.wall:.0f}x "
          f"(CPU time {loop_time.cpu / vector_time.cpu:.0f}x)")
    print(f"(b) as a share of (c), the asset's whole row building: about {vector_time.wall / asset_time.wall:.0%}")


if __name__ == "__main__":
    main()
