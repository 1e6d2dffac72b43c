"""The simulate stage: for every explanation variant of a shard, the simulator's expected activation
per token of the valid split (5 top + 5 random records, scored) and, except for shuffled controls,
of the calibration split (5 top + 5 random, which fits the linear calibration of rsquared and
abs_dev_explained; a control is there for its correlation only), one row per sequence. An explanation whose text, sequences, simulator version and code are unchanged keeps its
earlier rows; a failed explanation, simulator or sequence is a row with an error, never a failed
shard. The sequences of several explanations go to the simulator together (fuller batches)."""

from collections.abc import Callable
from dataclasses import dataclass

import polars as pl

from neuron_assets.method.controls import is_control
from neuron_assets.method.records import split_random, split_top
from neuron_assets.stages.results import Simulation, attempt
from neuron_assets.stages.timing import ModelClock, Progress, ProgressState

SCHEMA = {"layer": pl.Int32, "unit": pl.Int32, "variant": pl.String, "explanation_id": pl.String,
          "seq_id": pl.Int32, "split": pl.String, "kind": pl.String, "expected": pl.List(pl.Float32),
          "n_failed_tokens": pl.Int32, "simulator_model": pl.String, "simulator_version": pl.String,
          "method": pl.String, "tokens_in": pl.Int64, "tokens_out": pl.Int64, "cost_usd": pl.Float64,
          "cache_hit": pl.Boolean, "code_version": pl.String, "error": pl.String}
SPLITS = ("valid", "calibration")  # the split that is scored, the split that calibrates it
# Explanations whose sequences go to a local simulator in one call: enough for full batches, few
# enough that the response cache is written (and progress reported) often. An endpoint's call
# carries its `requests_per_call` sequences, if that is more.
EXPLANATIONS_PER_CALL = 8


def simulated_sequences(kinds: dict, calibrate: bool = True) -> list[tuple[str, str, int]]:
    """Every sequence simulated for an explanation, as (split, kind, seq_id): the valid split, then
    with `calibrate` the calibration split (each 5 top, then 5 random records)."""
    out = []
    for split in SPLITS if calibrate else SPLITS[:1]:
        top, random = split_top(kinds.get("top", []))[split], split_random(kinds.get("random", []))[split]
        out += [(split, "top", s) for s, _ in top] + [(split, "random", s) for s, _ in random]
    return out


def reusable_simulations(previous: pl.DataFrame | None, simulator_version: str, code_version: str) -> dict:
    """{(neuron, variant): rows} of earlier simulations that all succeeded with the same simulator
    version (backend, model, endpoint, method setting) and code."""
    if previous is None or "simulator_version" not in previous.columns:
        return {}
    ok = previous.filter((pl.col("simulator_version") == simulator_version) & (pl.col("code_version") == code_version))
    groups = ok.partition_by("unit", "variant", as_dict=True)
    return {key: rows for key, rows in groups.items() if rows["error"].is_null().all()}


@dataclass
class Simulated:
    rows: list[dict]  # rows of SCHEMA
    reused: int  # explanations whose earlier rows were kept
    sequences: int  # sequences sent to the simulator now (from its response cache or not)
    cache_hits: int
    seconds: float
    model_seconds: float


def explanations_per_call(simulator, sequences: int) -> int:
    """How many explanations of `sequences` sequences each go to `simulator` in one call."""
    return max(EXPLANATIONS_PER_CALL, simulator.requests_per_call // max(1, sequences))


def simulate_jobs(engine, jobs: list[tuple[str, list[list[str]]]]) -> list[list[Simulation]]:
    """`engine.simulate_many(jobs)`; where that call fails, each job alone, so that a failure (a
    prompt over the context) is the error of its own explanation's rows only."""
    results, error = attempt("simulator failed", engine.simulate_many, jobs)
    if not error:
        return results
    out = []
    for job in jobs:
        results, error = attempt("simulator failed", engine.simulate_many, [job])
        out.append(results[0] if not error else [Simulation.failed(error, len(tokens)) for tokens in job[1]])
    return out


def simulate_units(explained: pl.DataFrame, records: dict, tokens: dict[int, list[str]], previous: pl.DataFrame | None,
                   simulator, fewshot: list[dict], code_version: str,
                   report: Callable[[ProgressState], None] = print, what: str = "simulating",
                   log: Callable[[str], None] | None = None) -> Simulated:
    """Simulate each row of `explained` (stages/variants.py) on its neuron's valid and calibration
    splits of `records` ({neuron: {kind: [(seq_id, activations)]}}); `simulator` is an LLM
    (resources/llm.py), whose engine is loaded, or its endpoint probed (said through `log`), only
    when a row needs it. Rows come in the order of `explained`, whatever was batched together."""
    version = simulator.version("simulator")
    earlier = reusable_simulations(previous, version, code_version)
    done: list[list[dict]] = []  # per row of `explained`, its rows
    todo: list[tuple[int, dict, list[tuple[str, str, int]]]] = []  # (index in done, explanation, sequences)

    def row(e: dict, method: str, split: str | None, kind: str | None, seq_id: int | None,
            result: Simulation) -> dict:
        expected = None if result.expected is None else result.expected.tolist()
        return {"layer": e["layer"], "unit": e["unit"], "variant": e["variant"],
                "explanation_id": e["explanation_id"], "seq_id": seq_id, "split": split, "kind": kind,
                "expected": expected, "n_failed_tokens": result.n_failed, "simulator_model": simulator.label,
                "simulator_version": version, "method": method, **result.usage.row(), "code_version": code_version,
                "error": result.error}

    reused = 0
    for e in explained.iter_rows(named=True):
        if e["error"] is not None:
            done.append([row(e, "none", None, None, None, Simulation.failed(f"no explanation: {e['error']}"))])
            continue
        sequences = simulated_sequences(records[e["unit"]], calibrate=not is_control(e["variant"]))
        before = earlier.get((e["unit"], e["variant"]))
        if (before is not None and before["explanation_id"][0] == e["explanation_id"]
                and "split" in before.columns and set(before.select("split", "kind", "seq_id").rows()) == set(sequences)):
            done.append(before.to_dicts())  # no LLM call, and identical rows
            reused += 1
            continue
        done.append([])
        todo.append((len(done) - 1, e, sequences))

    progress = Progress(report, len(todo), what, "explanations")
    clock = ModelClock()
    engine, calls, hits = None, 0, 0
    per_call = explanations_per_call(simulator, max((len(sequences) for *_, sequences in todo), default=1))
    for start in range(0, len(todo), per_call):
        chunk = todo[start:start + per_call]
        if engine is None:
            engine, error = attempt("simulator unusable", simulator.simulation, fewshot, log)
            if error:  # prefix too long, endpoint down: every explanation gets this error
                failed = Simulation.failed(error)
                for i, e, _ in todo:
                    done[i] = [row(e, "none", None, None, None, failed)]
                progress.advance(len(todo))
                break
        jobs = [(e["text"], [tokens[seq_id] for _, _, seq_id in sequences]) for _, e, sequences in chunk]
        with clock.running():
            results = simulate_jobs(engine, jobs)
        for (i, e, sequences), simulated in zip(chunk, results):
            calls += len(sequences)
            hits += sum(result.usage.cache_hit for result in simulated)
            done[i] = [row(e, engine.method, split, kind, seq_id, result)
                       for (split, kind, seq_id), result in zip(sequences, simulated)]
        progress.advance(len(chunk))
    return Simulated([r for rows in done for r in rows], reused, calls, hits, progress.seconds, clock.seconds)
