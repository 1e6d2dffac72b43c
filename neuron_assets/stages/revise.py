"""The revise stage: each `llm` explanation of a shard is simulated on the held-out calibration
records; where it misses activations or raises false alarms, the explainer sees those excerpts
with its train records and first explanation and writes the `revised` variant. Where nothing is
mispredicted the first explanation stands. A revision whose inputs did not change is reused; a
failure is a row with an error, never a failed shard."""

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import polars as pl

from neuron_assets.method.records import split_random, split_top
from neuron_assets.method.revision import counterexamples, revision_messages
from neuron_assets.stages.explain import SCHEMA, explanation_row, explanation_text
from neuron_assets.stages.records import max_activation, records_hash
from neuron_assets.stages.results import Answer, Usage, attempt, total
from neuron_assets.stages.seeds import REVISE, unit_seed
from neuron_assets.stages.simulate import explanations_per_call, simulate_jobs
from neuron_assets.stages.timing import ModelClock, Progress, ProgressState
from neuron_assets.versions import digest

REVISED_SCHEMA = {**SCHEMA, "revised_from": pl.String, "misses": pl.Int32, "false_alarms": pl.Int32}


def held_out(kinds: dict) -> list[tuple[int, np.ndarray]]:
    """The calibration split (5 top + 5 random records): never shown to the explainer, never scored."""
    return split_top(kinds.get("top", []))["calibration"] + split_random(kinds.get("random", []))["calibration"]


def reusable_revision(previous: pl.DataFrame | None, first: dict, rhash: str, inputs: str,
                      code_version: str) -> dict | None:
    """The neuron's earlier revision, if it came from the same first explanation, excerpts, LLM
    versions, seed and code."""
    if previous is None or "inputs_version" not in previous.columns:
        return None
    match = previous.filter((pl.col("unit") == first["unit"]) & pl.col("error").is_null()
                            & (pl.col("revised_from") == first["explanation_id"]) & (pl.col("records_hash") == rhash)
                            & (pl.col("inputs_version") == inputs) & (pl.col("code_version") == code_version))
    return match.row(0, named=True) if match.height else None


@dataclass
class Revised:
    rows: list[dict]  # rows of REVISED_SCHEMA
    revised: int  # revisions asked of the explainer
    kept: int  # first explanations that mispredicted nothing
    reused: int  # revisions taken from the previous rows
    seconds: float
    model_seconds: float


def revise_units(layer: int, first: pl.DataFrame, records: dict, tokens: dict[int, list[str]],
                 previous: pl.DataFrame | None, explainer, simulator, fewshot: list[dict], prompt_version: str,
                 seed: int, code_version: str, report: Callable[[ProgressState], None] = print,
                 what: str = "revising", log: Callable[[str], None] | None = None) -> Revised:
    """Revise the `llm` rows `first` of the explanations table; `records` as in explain_units,
    `explainer` and `simulator` LLMs (resources/llm.py), `fewshot` the simulator's examples."""
    label = f"{explainer.label} (revision; simulator {simulator.label})"
    inputs = digest([explainer.version("explainer"), simulator.version("simulator"), seed])
    rows, pending, reused, kept, engine = [], [], 0, 0, None
    progress = Progress(report, first.height, f"{what}: simulating held-out excerpts", "explanations")
    clock = ModelClock()

    def row(e: dict, text: str | None, rhash: str | None, usage: Usage = Usage(), error: str | None = None,
            misses: int = 0, false_alarms: int = 0) -> dict:
        out = explanation_row(layer, e["unit"], "revised", text, label, prompt_version, rhash, usage, error, inputs)
        return {**out, "revised_from": e["explanation_id"], "misses": misses, "false_alarms": false_alarms,
                "code_version": code_version}

    # the held-out excerpts of every explanation to revise, simulated in calls of several explanations
    explanations = list(first.iter_rows(named=True))
    ok = [i for i, e in enumerate(explanations) if e["error"] is None]
    calibrations = {i: held_out(records[explanations[i]["unit"]]) for i in ok}
    hashes = {i: records_hash(calibrations[i]) for i in ok}
    earlier = {i: reusable_revision(previous, explanations[i], hashes[i], inputs, code_version) for i in ok}
    to_simulate = [i for i in ok if not earlier[i]]
    progress.advance(first.height - len(to_simulate))
    simulations: dict[int, list | str] = {}  # per explanation, its simulations or why there are none
    per_call = explanations_per_call(simulator, max((len(c) for c in calibrations.values()), default=1))
    for start in range(0, len(to_simulate), per_call):
        chunk = to_simulate[start:start + per_call]
        if engine is None:
            engine, error = attempt("simulator failed", simulator.simulation, fewshot, log)
            if error:  # endpoint down, prefix too long: every row says so
                simulations.update({i: error for i in to_simulate})
                break
        jobs = [(explanations[i]["text"], [tokens[s] for s, _ in calibrations[i]]) for i in chunk]
        with clock.running():
            simulations.update(zip(chunk, simulate_jobs(engine, jobs)))
        progress.advance(len(chunk))

    for i, e in enumerate(explanations):
        if e["error"] is not None:
            rows.append(row(e, None, None, error=f"no llm explanation to revise: {e['error']}"))
            continue
        kinds, calibration, rhash, results = records[e["unit"]], calibrations[i], hashes[i], simulations.get(i)
        if earlier[i]:  # same first explanation, excerpts, models and code: no LLM call
            rows.append(earlier[i])
            reused += 1
            continue
        if isinstance(results, str):
            rows.append(row(e, None, rhash, error=results))
            continue
        spent = total(r.usage for r in results)
        usage = Usage(spent.tokens_in, spent.tokens_out, spent.cost_usd)  # cache_hit: the explainer answer's alone
        if all(r.expected is None for r in results):
            rows.append(row(e, None, rhash, usage, f"first explanation could not be simulated: {results[0].error}"))
            continue
        real = [a for _, a in calibration]
        simulated = [np.full(len(a), np.nan) if r.expected is None else r.expected for r, a in zip(results, real)]
        misses, false_alarms = counterexamples(real, simulated, max_activation(kinds["top"]))
        if not misses and not false_alarms:
            rows.append(row(e, e["text"], rhash, usage))  # nothing mispredicted: the first stands
            kept += 1
            continue
        shown = [(tokens[s], a) for s, a in split_top(kinds["top"])["train"]]
        messages = revision_messages(
            e["text"], shown, [(tokens[calibration[i][0]], real[i]) for i in misses],
            [(tokens[calibration[i][0]], real[i], simulated[i]) for i in false_alarms],
            prefill=explainer.continues_assistant_turn)
        pending.append((e, rhash, messages, usage, len(misses), len(false_alarms)))

    # the explainer's revisions, after the simulations: their own progress, so 100% above is not the end
    asked = Progress(report, len(pending), f"{what}: asking the explainer", "revisions")
    for start in range(0, len(pending), explainer.requests_per_call):
        batch = pending[start : start + explainer.requests_per_call]
        seeds = [unit_seed(seed, layer, e["unit"], REVISE) for e, *_ in batch]
        conversations = [messages for _, _, messages, *_ in batch]
        with clock.running():
            answers, error = attempt("explainer failed", explainer.complete, conversations, seeds)
        if error:
            answers = [Answer.failed(error)] * len(batch)
        for (e, rhash, _, usage, n_miss, n_false), answer in zip(batch, answers):
            text, error = explanation_text(answer, "revision")
            spent = Usage(usage.tokens_in + answer.usage.tokens_in, usage.tokens_out + answer.usage.tokens_out,
                          usage.cost_usd + answer.usage.cost_usd, answer.usage.cache_hit)
            rows.append(row(e, text, rhash, spent, error, n_miss, n_false))
        asked.advance(len(batch))
    return Revised(rows, len(pending), kept, reused, progress.seconds, clock.seconds)
