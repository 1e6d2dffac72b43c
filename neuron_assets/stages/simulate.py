"""The simulate stage: for every explanation variant of a shard, the simulator's expected activation
per token of the valid split (5 top + 5 random records), one row per sequence. An explanation whose
text, sequences, simulator version and code are unchanged keeps its earlier rows; a failed
explanation, simulator or sequence is a row with an error, never a failed shard."""

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import polars as pl

from neuron_assets.method.records import split_random, split_top
from neuron_assets.stages.results import Simulation
from neuron_assets.stages.timing import ModelClock, Progress, ProgressState

SCHEMA = {"layer": pl.Int32, "neuron": pl.Int32, "variant": pl.String, "explanation_id": pl.String,
          "seq_id": pl.Int32, "kind": pl.String, "expected": pl.List(pl.Float32),
          "n_failed_tokens": pl.Int32, "simulator_model": pl.String, "simulator_version": pl.String,
          "method": pl.String, "tokens_in": pl.Int64, "tokens_out": pl.Int64, "cost_usd": pl.Float64,
          "cache_hit": pl.Boolean, "code_version": pl.String, "error": pl.String}


def valid_split(kinds: dict) -> list[tuple[str, int, np.ndarray]]:
    """The scored sequences as (kind, seq_id, activations): 5 valid top records, then 5 valid random
    records (docs/method.md)."""
    top = split_top(kinds.get("top", []))["valid"]
    random = split_random(kinds.get("random", []))["valid"]
    return [("top", s, a) for s, a in top] + [("random", s, a) for s, a in random]


def reusable_simulations(previous: pl.DataFrame | None, simulator_version: str, code_version: str) -> dict:
    """{(neuron, variant): rows} of earlier simulations that all succeeded with the same simulator
    version (backend, model, endpoint, method setting) and code."""
    if previous is None or "simulator_version" not in previous.columns:
        return {}
    ok = previous.filter((pl.col("simulator_version") == simulator_version) & (pl.col("code_version") == code_version))
    groups = ok.partition_by("neuron", "variant", as_dict=True)
    return {key: rows for key, rows in groups.items() if rows["error"].is_null().all()}


@dataclass
class Simulated:
    rows: list[dict]  # rows of SCHEMA
    reused: int  # explanations whose earlier rows were kept
    sequences: int  # sequences sent to the simulator now (from its response cache or not)
    cache_hits: int
    seconds: float
    model_seconds: float


def simulate_units(explained: pl.DataFrame, records: dict, tokens: dict[int, list[str]], previous: pl.DataFrame | None,
                   simulator, fewshot: list[dict], code_version: str,
                   report: Callable[[ProgressState], None] = print, what: str = "simulating",
                   log: Callable[[str], None] | None = None) -> Simulated:
    """Simulate each row of `explained` (stages/variants.py) on its neuron's valid split of
    `records` ({neuron: {kind: [(seq_id, activations)]}}); `simulator` is an LLM (resources/llm.py),
    whose engine is loaded, or its endpoint probed (said through `log`), only when a row needs it."""
    version = simulator.version("simulator")
    earlier = reusable_simulations(previous, version, code_version)
    engine, engine_error, rows, reused, calls, hits = None, None, [], 0, 0, 0

    def row(e: dict, method: str, kind: str | None, seq_id: int | None, result: Simulation) -> dict:
        expected = None if result.expected is None else result.expected.tolist()
        return {"layer": e["layer"], "neuron": e["neuron"], "variant": e["variant"],
                "explanation_id": e["explanation_id"], "seq_id": seq_id, "kind": kind, "expected": expected,
                "n_failed_tokens": result.n_failed, "simulator_model": simulator.label, "simulator_version": version,
                "method": method, **result.usage.row(), "code_version": code_version, "error": result.error}

    progress = Progress(report, explained.height, what, "explanations")
    clock = ModelClock()
    for e in explained.iter_rows(named=True):
        progress.advance()
        if e["error"] is not None:
            rows.append(row(e, "none", None, None, Simulation.failed(f"no explanation: {e['error']}")))
            continue
        sequences = valid_split(records[e["neuron"]])
        before = earlier.get((e["neuron"], e["variant"]))
        if (before is not None and before["explanation_id"][0] == e["explanation_id"]
                and set(before.select("kind", "seq_id").rows()) == {(k, s) for k, s, _ in sequences}):
            rows += before.to_dicts()  # no LLM call, and identical rows
            reused += 1
            continue
        if engine is None and engine_error is None:
            try:
                engine = simulator.simulation(fewshot, log=log)
            except Exception as exc:  # prefix too long, endpoint down: every explanation gets this error
                engine_error = f"simulator unusable: {type(exc).__name__}: {exc}"
        if engine_error:
            rows.append(row(e, "none", None, None, Simulation.failed(engine_error)))
            continue
        calls += len(sequences)
        try:
            with clock.running():
                results = engine.simulate(e["text"], [tokens[seq_id] for _, seq_id, _ in sequences])
        except Exception as exc:  # a failed explanation is rows with its error; the shard goes on
            message = f"simulator failed: {type(exc).__name__}: {exc}"
            results = [Simulation.failed(message, len(tokens[seq_id])) for _, seq_id, _ in sequences]
        hits += sum(result.usage.cache_hit for result in results)
        rows += [row(e, engine.method, kind, seq_id, result) for (kind, seq_id, _), result in zip(sequences, results)]
    return Simulated(rows, reused, calls, hits, progress.seconds, clock.seconds)

