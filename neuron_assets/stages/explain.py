"""The explain stage: per unit of a shard, the `llm` explanation (the explainer sees the train top
records) and the `token_baseline` one (no LLM), as rows of the explanations table. A unit whose
inputs did not change since the previous rows is not asked again; a unit that cannot be explained,
or whose batch failed, is a row with an error, never a failed shard."""

import hashlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import polars as pl

from neuron_assets.method.baseline import token_baseline
from neuron_assets.method.output import output_tokens_explanation, promoted_tokens_note
from neuron_assets.method.prompts import clean_explanation, explainer_messages
from neuron_assets.method.records import split_random, split_top
from neuron_assets.stages.records import max_activation, records_hash
from neuron_assets.stages.results import Answer, Usage, attempt
from neuron_assets.stages.seeds import EXPLAIN, EXPLAIN_OUTPUT, unit_seed
from neuron_assets.stages.timing import ModelClock, Progress, ProgressState
from neuron_assets.versions import digest

SCHEMA = {"layer": pl.Int32, "unit": pl.Int32, "variant": pl.String, "explanation_id": pl.String,
          "text": pl.String, "explainer_model": pl.String, "prompt_version": pl.String,
          "records_hash": pl.String, "tokens_in": pl.Int64, "tokens_out": pl.Int64, "cost_usd": pl.Float64,
          "cache_hit": pl.Boolean, "code_version": pl.String, "inputs_version": pl.String, "error": pl.String}
VARIANTS = ("llm", "token_baseline")
# with NEURON_ASSETS_OUTPUT_VARIANTS=on (method/output.py): the tokens the unit's output promotes, as an
# explanation (no LLM), and shown to the explainer beside the records
OUTPUT_TOKENS, LLM_OUTPUT = "output_tokens", "llm_output"
# per unit, the tokens its output direction promotes most, best first (rank 0): the evidence of both
OUTPUT_TOKENS_SCHEMA = {"unit": pl.Int32, "rank": pl.Int32, "token_id": pl.Int64, "token": pl.String,
                        "logit": pl.Float32}
N_OUTPUT_TOKENS = 10
ASKED = {"llm": EXPLAIN, LLM_OUTPUT: EXPLAIN_OUTPUT}  # the variants the explainer writes: their seeds' purpose


def explanation_row(layer: int, neuron: int, variant: str, text: str | None, model: str, prompt_version: str,
                    rhash: str | None, usage: Usage = Usage(), error: str | None = None,
                    inputs_version: str | None = None) -> dict:
    """A row of SCHEMA (but code_version); its explanation_id hashes what the explanation is and
    what it was made from."""
    explanation_id = hashlib.sha256(f"{layer}|{neuron}|{variant}|{text}|{model}|{prompt_version}|{rhash}".encode())
    return {"layer": layer, "unit": neuron, "variant": variant, "explanation_id": explanation_id.hexdigest()[:16],
            "text": text, "explainer_model": model, "prompt_version": prompt_version, "records_hash": rhash,
            **usage.row(), "inputs_version": inputs_version, "error": error}


def reusable_explanation(previous: pl.DataFrame | None, neuron: int, rhash: str, inputs: str, code_version: str,
                         variant: str = "llm") -> dict | None:
    """The neuron's earlier explanation by `variant` (one the explainer writes), if it came from the
    same records, explainer version, seed, prompt and code."""
    if previous is None or "inputs_version" not in previous.columns:
        return None
    match = previous.filter(
        (pl.col("unit") == neuron) & (pl.col("variant") == variant) & pl.col("error").is_null()
        & (pl.col("records_hash") == rhash) & (pl.col("inputs_version") == inputs)
        & (pl.col("code_version") == code_version)
    )
    return match.row(0, named=True) if match.height else None


def explanation_text(answer: Answer, what: str) -> tuple[str | None, str | None]:
    """(the cleaned explanation, None), or (None, why there is none) for a failed or empty answer."""
    if answer.error is not None:
        return None, answer.error
    text = clean_explanation(answer.text)
    return (text, None) if text else (None, f"explainer returned an empty {what}")


def previous_units(previous: pl.DataFrame | None) -> list[int]:
    """The units the table's previous rows explain (whose records a run also needs: `kept_units`)."""
    return [] if previous is None else sorted(set(previous["unit"].to_list()))


def kept_units(selected: list[int], records: dict, previous: pl.DataFrame | None, inputs: str,
               code_version: str) -> list[int]:
    """The units outside the selection whose earlier llm explanation is still valid (same records,
    explainer version, seed, prompt and code): a narrower selection never throws a result away; an
    outdated one goes."""
    kept = []
    for unit in (u for u in previous_units(previous) if u not in set(selected) and u in records):
        try:
            train = split_top(records[unit].get("top", []))["train"]
        except ValueError:
            continue
        if reusable_explanation(previous, unit, records_hash(train), inputs, code_version):
            kept.append(unit)
    return kept


@dataclass
class Explained:
    rows: list[dict]  # rows of SCHEMA, code_version and inputs_version filled in
    kept: int  # units outside the selection whose valid rows stay
    reused: int  # llm explanations taken from the previous rows
    asked: int  # explanations asked of the explainer (from its response cache or not)
    cache_hits: int
    seconds: float
    model_seconds: float


def rare_reasons(stats: pl.DataFrame, rare: list[int], min_frequency: float) -> dict[int, str]:
    """{unit: why it is not explained} for the `rare` units of neuron_records' `stats` table."""
    frequency = dict(zip(stats["unit"].to_list(), stats["activation_frequency"].to_list()))
    return {unit: f"rare unit: above 0 on {frequency[unit]:.3g} of the corpus's tokens, under "
                  f"NEURON_ASSETS_MIN_ACTIVATION_FREQUENCY={min_frequency:g}; not explained" for unit in rare}


def output_tokens(subject_model, layer: int, units: list[int]) -> pl.DataFrame:
    """OUTPUT_TOKENS_SCHEMA rows: per unit of `layer` in `units`, the N_OUTPUT_TOKENS tokens its output
    direction promotes most (`SubjectModel.promoted_tokens`), each written as the tokenizer decodes
    it alone."""
    ids, logits = subject_model.promoted_tokens(layer, units, N_OUTPUT_TOKENS)
    decode = subject_model.tokenizer().decode
    return pl.DataFrame({"unit": np.repeat(np.asarray(units, dtype=np.int32), N_OUTPUT_TOKENS),
                         "rank": np.tile(np.arange(N_OUTPUT_TOKENS), len(units)), "token_id": ids.reshape(-1),
                         "token": [decode([int(i)]) for i in ids.reshape(-1)], "logit": logits.reshape(-1)},
                        schema=OUTPUT_TOKENS_SCHEMA)


def promoted_by_unit(output_tokens: pl.DataFrame) -> dict[int, list[str]]:
    """{unit: its promoted tokens, best first} from an OUTPUT_TOKENS_SCHEMA table."""
    ranked = output_tokens.sort("unit", "rank").group_by("unit", maintain_order=True).agg("token")
    return dict(zip(ranked["unit"].to_list(), ranked["token"].to_list()))


def explain_units(layer: int, units: list[int], records: dict, tokens: dict[int, list[str]],
                  previous: pl.DataFrame | None, explainer, fewshot: list[dict], prompt_version: str, seed: int,
                  code_version: str, report: Callable[[ProgressState], None] = print,
                  what: str = "explaining", rare: dict[int, str] | None = None,
                  promoted: dict[int, list[str]] | None = None) -> Explained:
    """Explain `units` of `layer` from their `records` ({unit: {kind: [(seq_id, activations)]}}, also
    for the `previous_units`) and the corpus `tokens`; `explainer` is an LLM (resources/llm.py) and
    `previous` the table's rows from its last run (reused where records, explainer version, seed,
    prompt and code are the same; kept for units the selection left out, `kept_units`). A unit of
    `rare` ({unit: reason}, `rare_reasons`) gets rows with that reason as their error, and no LLM work.
    With `promoted` ({unit: tokens}, `promoted_by_unit`) each unit also gets an `output_tokens` row and
    an `llm_output` one (the explainer also reads its promoted tokens; for a kept unit only if reusable)."""
    inputs = digest([explainer.version("explainer"), seed])
    kept = kept_units(units, records, previous, inputs, code_version)
    rare = rare or {}
    variants = VARIANTS if promoted is None else (*VARIANTS, OUTPUT_TOKENS, LLM_OUTPUT)
    selected = set(units)
    rows, pending, reused, hits = [], [], 0, 0
    for unit in sorted([*units, *kept]):
        if unit in rare:
            rows += [explanation_row(layer, unit, v, None, explainer.label, prompt_version, None, error=rare[unit])
                     for v in variants]
            continue
        kinds = records[unit]
        try:
            train = split_top(kinds.get("top", []))["train"]
            negatives = split_random(kinds.get("random", []))["calibration"]
        except ValueError as e:
            rows += [explanation_row(layer, unit, v, None, explainer.label, prompt_version, None,
                                     error=f"not enough records: {e}") for v in variants]
            continue
        rhash = records_hash(train)
        top_max = max_activation(kinds["top"])
        if top_max <= 0:
            reason = f"neuron never activates: max activation {top_max:.4g} <= 0 over the corpus"
            rows += [explanation_row(layer, unit, v, None, explainer.label, prompt_version, rhash, error=reason)
                     for v in variants]
            continue
        shown = [(tokens[s], acts) for s, acts in train]
        baseline = token_baseline(shown + [(tokens[s], acts) for s, acts in negatives])
        rows.append(explanation_row(layer, unit, "token_baseline", baseline, "none", prompt_version, rhash,
                                    error=None if baseline else "no token has a positive mean activation"))
        notes = {"llm": ""}
        if promoted is not None:
            output = output_tokens_explanation(promoted.get(unit, []))
            rows.append(explanation_row(layer, unit, OUTPUT_TOKENS, output, "none", prompt_version, rhash,
                                        error=None if output else "the unit's output promotes no printable token"))
            notes[LLM_OUTPUT] = promoted_tokens_note(promoted.get(unit, []))
        for variant, note in notes.items():
            earlier = reusable_explanation(previous, unit, rhash, inputs, code_version, variant)
            if earlier:  # same records, explainer, seed and prompt: no LLM call, and an identical row
                rows.append(earlier)
                reused += 1
            elif unit in selected:  # a kept unit keeps what is valid, and is not asked anything new
                pending.append((unit, variant, rhash, explainer_messages(
                    shown, fewshot, prefill=explainer.continues_assistant_turn, note=note)))

    progress = Progress(report, len(pending), what, "units" if promoted is None else "explanations")
    clock = ModelClock()
    for start in range(0, len(pending), explainer.requests_per_call):
        batch = pending[start : start + explainer.requests_per_call]
        seeds = [unit_seed(seed, layer, unit, ASKED[variant]) for unit, variant, _, _ in batch]
        conversations = [messages for *_, messages in batch]
        with clock.running():
            answers, error = attempt("explainer failed", explainer.complete, conversations, seeds)
        if error:
            answers = [Answer.failed(error)] * len(batch)
        hits += sum(answer.usage.cache_hit for answer in answers)
        for (unit, variant, rhash, _), answer in zip(batch, answers):
            text, error = explanation_text(answer, "explanation")
            rows.append(explanation_row(layer, unit, variant, text, explainer.label, prompt_version, rhash,
                                        answer.usage, error))
        progress.advance(len(batch))
    rows = [{**row, "code_version": code_version, "inputs_version": inputs} for row in rows]
    return Explained(rows, len(kept), reused, len(pending), hits, progress.seconds, clock.seconds)
