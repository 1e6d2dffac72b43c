"""Throughput of the remote LLM path: a shard's explanations and simulations
through a loopback OpenAI-compatible server with a fixed latency, two orders side by side in one run.

Server: tests/oracle_server.py's rule-based `OracleServer` (no model; JSON simulation, as a
chat-only endpoint) in a child process, so that its CPU work does not share this process's GIL.
Every chat request is answered after --latency-ms (a sleep), at most --concurrency at once (a
semaphore over a thread per connection); the server counts the requests it got and the most it
had in flight.

Client: the `LLM` resource (backend openai, simulation_method json, max_concurrency
--concurrency, the other fields at their defaults, batch_size 8 as the definitions leave it)
through the plain stage functions the assets call: `explain_units` (stages/explain.py), then
`explanation_variants` with shuffled controls (stages/variants.py), then `simulate_units`
(stages/simulate.py). A fresh response cache per mode, so no measured request is a cache hit.

The shard: --units units, each with 20 top and 15 random records, windows of --seq-len words of
the embedded corpus (the Python docs), distinct across units. Per unit: 1 explanation request,
then 60 simulation requests (llm and token_baseline: 10 valid + 10 calibration sequences each;
their shuffled controls: the 10 valid ones).

(a) now: the stages as they are (`LLM.requests_per_call` explanation requests per `complete` call,
    `explanations_per_call` explanations' sequences per `simulate_many` call, each call's requests
    max_concurrency at once);
(b) old order: batch_size (8) explanations per `complete` call, and one explanation at a time to
    the simulator (each explanation's sequences one `simulate_many` call, then the next).

Prints per mode and phase the requests the server got, wall seconds, requests/s, their ratio to
the ideal (concurrency / latency), the share of request slots the calls' sizes can fill at best
("slots fillable": each call waits for its last request, so a call of n requests takes
ceil(n / concurrency) latencies), the server's most requests in flight, the CPU seconds of this
process (all of the client; per request too) and of the server's, and neurons/hour. The last
line is `ratio=<x>`: (a)'s requests/s over the ideal (target >= 0.8).

Run: .venv/bin/python bench/remote_throughput.py [--units 32] [--latency-ms 200] [--concurrency 32]
     [--seq-len 64]   (about 1.5 minutes with the defaults on 2 busy cores)
"""

import argparse
import math
import multiprocessing
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import polars as pl

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the oracle server lives there

from openai_server import _HTTPServer, _Handler  # noqa: E402
from oracle_server import OracleServer  # noqa: E402

from neuron_assets.method.controls import is_control  # noqa: E402
from neuron_assets.method.prompts import load_fewshot  # noqa: E402
from neuron_assets.resources.corpus import python_docs  # noqa: E402
from neuron_assets.resources.llm import LLM  # noqa: E402
from neuron_assets.resources.openai_client import reset_shared_limits  # noqa: E402
from neuron_assets.resources.study import PROMPTS  # noqa: E402
from neuron_assets.stages import simulate  # noqa: E402
from neuron_assets.stages.explain import SCHEMA, explain_units  # noqa: E402
from neuron_assets.stages.simulate import simulate_units, simulated_sequences  # noqa: E402
from neuron_assets.stages.variants import explanation_variants  # noqa: E402

TOP, RANDOM = 20, 15  # what split_top (4 splits of 5) and split_random (3 splits of 5) deal
TARGET = 0.8


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--units", type=int, default=32, help="units of the shard")
    parser.add_argument("--latency-ms", type=float, default=200.0, help="the server's time per request")
    parser.add_argument("--concurrency", type=int, default=32,
                        help="requests the server serves at once, and the client's max_concurrency")
    parser.add_argument("--seq-len", type=int, default=64, help="words per record window")
    return parser.parse_args()


# ----------------------------------------------------------------------------- the server


class _Backlog(_HTTPServer):
    # socketserver's default listen backlog (5) drops part of a burst of new connections, which then
    # wait a second for the SYN to be sent again: that would be billed to the client.
    request_queue_size = 256


class SlowOracle(OracleServer):
    """The oracle answering each chat request after `latency_s`, at most `slots` at once."""

    def __init__(self, latency_s: float, slots: int):
        super().__init__()
        self.latency_s = latency_s
        self.slots = threading.BoundedSemaphore(slots)

    def start(self) -> "SlowOracle":
        self._httpd = _Backlog(("127.0.0.1", 0), _Handler)
        self._httpd.owner = self
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="slow-oracle", daemon=True)
        self._thread.start()
        return self

    def _chat(self, body: dict) -> dict:
        with self.slots:
            time.sleep(self.latency_s)
            return super()._chat(body)


def serve(latency_s: float, slots: int, conn) -> None:
    """The child process: sends the base URL, then answers each "stats" message with (POSTs, most in
    flight, CPU seconds) since the last one, until "stop"."""
    server = SlowOracle(latency_s, slots).start()
    conn.send(server.base_url)
    cpu = time.process_time()
    while conn.recv() == "stats":
        conn.send((len(server.posts()), server.max_in_flight, time.process_time() - cpu))
        server.requests.clear()
        server.max_in_flight = 0
        cpu = time.process_time()
    server.stop()


# ----------------------------------------------------------------------------- the shard


def shard(units: int, seq_len: int) -> tuple[dict, dict[int, list[str]]]:
    """{unit: {kind: [(seq_id, activations)]}} and {seq_id: tokens}: every unit its own windows of
    the corpus's words (overlapping when the corpus is short), so no two requests are the same; a
    unit's top records peak on one position, which decides its explanation."""
    words = " ".join(text for _, text in python_docs()).split()
    needed = units * (TOP + RANDOM)
    stride = min(seq_len, (len(words) - seq_len) // needed)
    if stride < 1:
        raise SystemExit(f"the corpus has {len(words)} words: too few for {units} units")
    tokens = {i: [" " + w for w in words[i * stride:i * stride + seq_len]] for i in range(needed)}
    records = {}
    for unit in range(units):
        first = unit * (TOP + RANDOM)
        peak = np.arange(seq_len) == unit % seq_len
        top = [(first + i, np.where(peak, 5.0 * (1 - i / 40), 0.0).astype(np.float32)) for i in range(TOP)]
        random = [(first + TOP + i, np.zeros(seq_len, dtype=np.float32)) for i in range(RANDOM)]
        records[unit] = {"top": top, "random": random}
    return records, tokens


# ----------------------------------------------------------------------------- measuring


class Phase(NamedTuple):
    requests: int  # POSTs the server got
    wall: float
    cpu: float  # this process's CPU seconds
    server_cpu: float  # the server process's
    max_in_flight: int  # at the server
    fillable: float  # share of request slots the calls' sizes can fill at best
    failed: int  # rows with an error


def fillable(call_sizes: list[int], concurrency: int) -> float:
    """Requests / (request slots of ceil(n / concurrency) latencies per call), calls one after another."""
    return sum(call_sizes) / (concurrency * sum(math.ceil(n / concurrency) for n in call_sizes))


def measured(conn, run, call_sizes: list[int], concurrency: int) -> tuple[object, Phase]:
    """run(), timed, with the server's count of its requests."""
    wall, cpu = time.perf_counter(), time.process_time()
    result, failed = run()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    conn.send("stats")
    requests, max_in_flight, server_cpu = conn.recv()
    return result, Phase(requests, wall, cpu, server_cpu, max_in_flight, fillable(call_sizes, concurrency), failed)


def quiet(_state) -> None:
    pass


def run_mode(conn, llm: LLM, old: bool, records: dict, tokens: dict, units: int) -> dict[str, Phase]:
    """Explain the shard, then simulate its variants: as the stages do now, or in the `old` order
    (explanations batch_size per call, simulations one explanation per call)."""
    explainer_fewshot = load_fewshot(f"{PROMPTS}/explainer_fewshot.json")
    simulator_fewshot = load_fewshot(f"{PROMPTS}/simulator_fewshot.json")
    per_request = llm.batch_size if old else llm.requests_per_call
    per_call = 1 if old else simulate.explanations_per_call(llm, 20)
    batches = [min(per_request, units - start) for start in range(0, units, per_request)]

    def explain():
        result = explain_units(0, list(range(units)), records, tokens, None, llm, explainer_fewshot, "bench",
                               seed=0, code_version="bench", report=quiet)
        table = pl.DataFrame(result.rows, schema=SCHEMA)
        return table, table.filter(pl.col("variant") == "llm")["error"].is_not_null().sum()

    saved = LLM.requests_per_call, simulate.explanations_per_call
    if old:
        LLM.requests_per_call = property(lambda self: self.batch_size)
        simulate.explanations_per_call = lambda simulator, sequences: 1
    try:
        table, explained = measured(conn, explain, batches, llm.max_concurrency)
        variants = explanation_variants([table], "bench", seed=0, control=True)
        ok = [len(simulated_sequences(records[e["unit"]], calibrate=not is_control(e["variant"])))
              for e in variants.filter(pl.col("error").is_null()).iter_rows(named=True)]
        calls = [sum(ok[start:start + per_call]) for start in range(0, len(ok), per_call)]

        def simulate_all():
            result = simulate_units(variants, records, tokens, None, llm, simulator_fewshot, "bench", report=quiet)
            return result, sum(row["error"] is not None for row in result.rows)

        _, simulated = measured(conn, simulate_all, calls, llm.max_concurrency)
    finally:
        LLM.requests_per_call, simulate.explanations_per_call = saved
    return {"explanations": explained, "simulations": simulated}


def total(phases: dict[str, Phase]) -> Phase:
    """The phases one after the other; slots fillable over both from the slots each phase takes at best."""
    values = list(phases.values())
    requests = sum(p.requests for p in values)
    slots = sum(p.requests / p.fillable for p in values)
    return Phase(requests, sum(p.wall for p in values), sum(p.cpu for p in values), sum(p.server_cpu for p in values),
                 max(p.max_in_flight for p in values), requests / slots, sum(p.failed for p in values))


def row(label: str, p: Phase, ideal: float) -> str:
    rate = p.requests / p.wall
    return (f"{label:<26} {p.requests:>8} {p.wall:>7.2f} {rate:>7.1f} {rate / ideal:>6.3f} {p.fillable:>8.3f} "
            f"{p.max_in_flight:>8} {p.cpu:>6.2f} {1000 * p.cpu / max(p.requests, 1):>7.2f} {p.server_cpu:>7.2f} "
            f"{p.failed:>6}")


def main() -> None:
    args = parse_args()
    latency = args.latency_ms / 1000
    ideal = args.concurrency / latency
    records, tokens = shard(args.units, args.seq_len)

    context = multiprocessing.get_context("spawn")  # a fresh interpreter: no threads or locks of this one
    conn, child_conn = context.Pipe()
    server = context.Process(target=serve, args=(latency, args.concurrency, child_conn), daemon=True)
    server.start()
    base_url = conn.recv()
    load_before = os.getloadavg()
    results = {}
    try:
        for mode, old in (("now", False), ("old order", True)):
            reset_shared_limits()  # each mode configures the endpoint's limits afresh
            with tempfile.TemporaryDirectory(prefix="bench-remote-") as cache:
                llm = LLM(backend="openai", model="oracle", base_url=base_url, api_key="sk-bench",
                          simulation_method="json", response_cache=cache, max_concurrency=args.concurrency)
                results[mode] = run_mode(conn, llm, old, records, tokens, args.units)
    finally:
        conn.send("stop")
        server.join(timeout=10)
    load_after = os.getloadavg()

    per_unit = results["now"]["simulations"].requests / args.units
    print("Remote LLM throughput: a shard through a loopback OpenAI-compatible server, now vs old order")
    print(f"server: oracle (tests/oracle_server.py) in a child process, {args.latency_ms:g} ms per request, "
          f"{args.concurrency} at once; ideal {ideal:.1f} requests/s")
    print(f"client: LLM openai, max_concurrency {args.concurrency}, json simulation, fresh response cache per mode; "
          f"{os.cpu_count()} CPUs")
    print(f"shard: {args.units} units, {args.seq_len}-word windows; per unit 1 explanation and {per_unit:.0f} "
          f"simulation requests; per call now {llm.requests_per_call} explanations and "
          f"{simulate.explanations_per_call(llm, 20)} explanations' simulations, in the old order "
          f"{llm.batch_size} and 1")
    print(f"load average (1 min) before {load_before[0]:.2f}, after {load_after[0]:.2f}")
    print()
    print(f"{'':<26} {'':>8} {'':>7} {'':>7} {'':>6} {'slots':>8} {'most in':>8} {'client CPU':>14} "
          f"{'server':>7}")
    print(f"{'mode, phase':<26} {'requests':>8} {'wall s':>7} {'req/s':>7} {'ratio':>6} {'fillable':>8} "
          f"{'flight':>8} {'s':>6} {'ms/req':>7} {'CPU s':>7} {'failed':>6}")
    totals = {}
    for mode, phases in results.items():
        for phase, p in phases.items():
            print(row(f"{mode}: {phase}", p, ideal))
        totals[mode] = total(phases)
        print(row(f"{mode}: total", totals[mode], ideal))
    print()
    hourly = {mode: 3600 * args.units / t.wall for mode, t in totals.items()}
    best = 3600 * ideal / (1 + per_unit)
    print(f"neurons/hour: now {hourly['now']:,.0f}, old order {hourly['old order']:,.0f}, "
          f"ideal {best:,.0f} (explanations and simulations; no scoring)")
    rate = {mode: t.requests / t.wall for mode, t in totals.items()}
    print(f"now vs old order: {rate['now'] / rate['old order']:.2f}x the requests/s")
    achieved = rate["now"] / ideal
    verdict = "PASS" if achieved >= TARGET else "MISS"
    print(f"now, requests/s vs ideal: {achieved:.3f} (target >= {TARGET:g}): {verdict}")
    print(f"ratio={achieved:.3f}")


if __name__ == "__main__":
    main()
