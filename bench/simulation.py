"""Simulation speed of the local simulator (docs/method.md, Simulation), three ways, side by side in one run.

On the embedded SmolLM2-135M, the real few-shot simulator prefix and real 64-token windows of the
embedded corpus (the Python docs), all under the same explanations:

(a) all at once, as the assets run it: one LocalSimulator (the prefix's key/value cache computed
    once; that construction is timed on its own row, as it is paid once per process), batches of
    8 sequences, for several neurons (explanations) in turn on the same cached prefix;
(b) recomputing the prefix every time, on the same neurons and sequences: a fresh LocalSimulator
    per sequence (batch of 1), its construction included in the time, since that is where the
    prefix is recomputed;
(c) token by token: `simulate_token_by_token`, one forward call per token, on the first few
    sequences only (it is slow), compared with (a) timed again on exactly those sequences;
(d) (a) with the model in bfloat16 (NEURON_ASSETS_SIMULATOR_DTYPE=bfloat16): its speed, and how far
    its probabilities are from float32's.

Prints wall-clock and CPU seconds, sequences/s and tokens processed per method, the largest
difference between the methods' p(value 0..10), and the two ratios with their targets:
  all at once vs token by token: at least 20x; prefix cache + batching vs recompute: at least 2x.
Targets are judged on the wall clock. On a shared machine other processes slow every method
down, unevenly over the run: the load average is printed before and after, and CPU seconds near
torch threads x wall seconds show a method had the cores to itself.

Run: .venv/bin/python bench/simulation.py [--sequences N] [--token-by-token-sequences M]
     [--neurons K] [--seq-len L] [--batch-size B]
"""

import argparse
import os
import platform
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from neuron_assets.method.prompts import load_fewshot, simulator_prefix, simulator_segments
from neuron_assets.resources.corpus import python_docs, token_windows
from neuron_assets.resources.local_llm import LocalSimulator
from neuron_assets.resources.models import describe_model, load_causal_lm

FEWSHOT = Path(__file__).resolve().parents[1] / "resources" / "prompts" / "simulator_fewshot.json"
EXPLANATIONS = [
    "Python keywords that start a statement, such as class, def, for and return",
    "punctuation that closes a bracket or ends a sentence",
    "words about errors and exceptions, such as raise, error and exception",
    "numbers and the names of built-in types",
]
ALL_AT_ONCE_TARGET = 20.0
PREFIX_CACHE_TARGET = 2.0


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sequences", type=int, default=8, help="sequences per neuron for (a) and (b)")
    parser.add_argument("--token-by-token-sequences", type=int, default=2, help="sequences for (c)")
    parser.add_argument("--neurons", type=int, default=2, choices=range(1, len(EXPLANATIONS) + 1),
                        help="explanations simulated in turn by (a) and (b)")
    parser.add_argument("--seq-len", type=int, default=64, help="tokens per corpus window")
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass in (a)")
    return parser.parse_args()


class Timing(NamedTuple):
    """Wall-clock seconds and this process's CPU seconds."""

    wall: float
    cpu: float

    def __add__(self, other: "Timing") -> "Timing":
        return Timing(self.wall + other.wall, self.cpu + other.cpu)

    def __sub__(self, other: "Timing") -> "Timing":
        return Timing(self.wall - other.wall, self.cpu - other.cpu)


def now() -> Timing:
    return Timing(time.perf_counter(), time.process_time())


class Run(NamedTuple):
    """One method's output on some sequences: probabilities, tokens processed, time taken."""

    probs: list[np.ndarray]
    tokens: int
    timing: Timing


def measure(function, *args) -> Run:
    """Run function(*args), which returns (probabilities, tokens processed), and time it."""
    start = now()
    probs, tokens = function(*args)
    return Run(probs, tokens, now() - start)


def total(runs: list[Run]) -> Timing:
    return sum((r.timing for r in runs[1:]), runs[0].timing)


def max_difference(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    """Largest absolute difference between two methods' [T, 11] probabilities."""
    return max(float(np.abs(x - y).max()) for x, y in zip(a, b))


def on_cached_prefix(simulate, simulator: LocalSimulator, sequences: list[list[str]]):
    """(a) or (c): `simulate` is a method of `simulator`, whose prefix is already encoded.
    Returns the probabilities and the tokens processed."""
    before = simulator.tokens_processed
    probs = simulate(sequences)
    return probs, simulator.tokens_processed - before


def recompute_every_time(model, tokenizer, prefix: str, sequences: list[list[str]]):
    """(b): a fresh simulator per sequence, so its prefix is encoded again each time.
    Returns the probabilities and the tokens processed, the prefixes included."""
    probs, tokens = [], 0
    for segments in sequences:
        simulator = LocalSimulator(model, tokenizer, prefix, batch_size=1)
        probs.extend(simulator.simulate([segments]))
        tokens += simulator.tokens_processed
    return probs, tokens


def row(method: str, n_sequences: int, timing: Timing, tokens: int) -> str:
    rate = f"{n_sequences / timing.wall:9.3f}" if n_sequences else f"{'-':>9}"
    return f"{method:<54} {n_sequences:>9} {timing.wall:>9.2f} {timing.cpu:>9.2f} {rate} {tokens:>10}"


def speedup(slow: Timing, fast: Timing, target: float | None = None) -> str:
    """slow / fast on the wall clock (judged against `target`) and on CPU time."""
    text = f"{slow.wall / fast.wall:.1f}x"
    if target is not None:
        text += f" (target >= {target:g}x): {'PASS' if slow.wall / fast.wall >= target else 'MISS'}"
    return text + f"; CPU time {slow.cpu / fast.cpu:.1f}x"


def main() -> None:
    args = parse_args()
    model, tokenizer = load_causal_lm("embedded", "~/.cache/neuron_assets", "cpu", dtype="float32")
    low, _ = load_causal_lm("embedded", "~/.cache/neuron_assets", "cpu", dtype="bfloat16")
    prefix = simulator_prefix(load_fewshot(FEWSHOT))
    windows = token_windows(tokenizer, python_docs(), args.seq_len, max_windows=args.sequences)["tokens"]
    neurons = [[simulator_segments(e, tokens) for tokens in windows] for e in EXPLANATIONS[: args.neurons]]
    first = neurons[0]
    n, k, m = len(first), len(neurons), min(args.token_by_token_sequences, len(first))
    load_before = os.getloadavg()

    with torch.inference_mode():
        # One untimed call, so that one-time kernel and allocator set-up is not billed to a method.
        LocalSimulator(model, tokenizer, "warm up", batch_size=1).simulate([first[0][:4]])
        LocalSimulator(low, tokenizer, "warm up", batch_size=1).simulate([first[0][:4]])

        start = now()
        cached = LocalSimulator(model, tokenizer, prefix, args.batch_size)
        setup = now() - start
        cached_low = LocalSimulator(low, tokenizer, prefix, args.batch_size)
        # (a), (b) and (d) alternate neuron by neuron, so that a change in the machine's load hits each.
        batched, recomputed, bfloat16 = [], [], []
        for segments in neurons:
            batched.append(measure(on_cached_prefix, cached.simulate, cached, segments))
            recomputed.append(measure(recompute_every_time, model, tokenizer, prefix, segments))
            bfloat16.append(measure(on_cached_prefix, cached_low.simulate, cached_low, segments))

        few = measure(on_cached_prefix, cached.simulate, cached, first[:m])
        one_by_one = measure(on_cached_prefix, cached.simulate_token_by_token, cached, first[:m])
    load_after = os.getloadavg()

    prompt_tokens = [len(tokenizer("".join(s), add_special_tokens=False)["input_ids"]) for s in first]
    print("Simulation speed: all at once (cached prefix) vs recomputed prefix vs token by token")
    print(f"model: {describe_model('embedded')}, {model.config.model_type}, {model.dtype}, "
          f"attention {model.config._attn_implementation}")
    print(f"device: {model.device}; torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"{os.cpu_count()} CPUs ({platform.machine()})")
    print(f"load average (1 min) before {load_before[0]:.2f}, after {load_after[0]:.2f}")
    print(f"prefix: {cached.prefix_tokens} tokens ({FEWSHOT.name}); {n} windows of {args.seq_len} corpus "
          f"tokens, target prompt {np.mean(prompt_tokens):.0f} tokens on average; {k} explanations; "
          f"batch size {args.batch_size}")
    print()
    print(f"{'method':<54} {'sequences':>9} {'wall s':>9} {'cpu s':>9} {'seq/s':>9} {'tokens':>10}")
    print(row("prefix cache construction (once per process)", 0, setup, cached.prefix_tokens))
    for label, runs in (("(a) all at once on one prefix cache", batched),
                        ("(b) recompute prefix per sequence, batch 1", recomputed)):
        print(row(f"{label}, 1 neuron", n, runs[0].timing, runs[0].tokens))
        print(row(f"{label}, {k} neurons", k * n, total(runs), sum(r.tokens for r in runs)))
    print(row(f"(d) all at once in bfloat16, {k} neurons", k * n, total(bfloat16), sum(r.tokens for r in bfloat16)))
    print(row(f"(a) all at once, first {m} sequences", m, few.timing, few.tokens))
    print(row(f"(c) token by token, first {m} sequences", m, one_by_one.timing, one_by_one.tokens))
    print()
    differences = [max_difference(a.probs, b.probs) for a, b in zip(batched, recomputed)]
    print(f"max |p(a) - p(b)| over {k} x {n} sequences: {max(differences):.2e}")
    print(f"max |p(a) - p(c)| over {m} sequences: {max_difference(few.probs, one_by_one.probs):.2e}")
    print(f"max |p(a) - p(d)| over {k} x {n} sequences: "
          f"{max(max_difference(a.probs, d.probs) for a, d in zip(batched, bfloat16)):.2e}")
    print()
    print(f"all at once vs token by token ({m} sequences, same inputs): "
          f"{speedup(one_by_one.timing, few.timing, ALL_AT_ONCE_TARGET)}")
    print(f"prefix cache + batching vs recompute ({k} neurons x {n} sequences, same inputs, construction "
          f"included): {speedup(total(recomputed), setup + total(batched), PREFIX_CACHE_TARGET)}")
    print(f"  same, 1 neuron, construction included: {speedup(recomputed[0].timing, setup + batched[0].timing)}")
    print(f"  same, 1 neuron, construction excluded: {speedup(recomputed[0].timing, batched[0].timing)}")
    print(f"bfloat16 vs float32, all at once ({k} neurons x {n} sequences): {speedup(total(batched), total(bfloat16))}")


if __name__ == "__main__":
    main()
