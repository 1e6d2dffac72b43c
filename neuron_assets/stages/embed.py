"""The embed stage: per explanation of a shard, the AUROC of the cosine similarity between the
explanation and each excerpt in a sentence-embedding space, positives (the valid + test top records)
against the random and hard negatives detection judges (method/embedding.py); rows of the
embedding_scores table. A unit's excerpts are embedded once and shared by all its variants. A
variant without explanation, or a unit with too few records, is a row with an error and NaN AUROCs."""

from collections.abc import Callable
from dataclasses import dataclass

import polars as pl

from neuron_assets.method.detection import KINDS, detection_examples, excerpt_text
from neuron_assets.method.embedding import embedding_aurocs
from neuron_assets.stages.detect import scored_records
from neuron_assets.stages.timing import ModelClock, Progress, ProgressState

# AUROC column -> key of `embedding_aurocs`
AUROCS = {"auroc": "all", "auroc_random": "random", "auroc_hard_negative": "hard_negative"}
COUNTS = tuple(f"n_{kind}" for kind in KINDS)  # n_positive, n_random, n_hard_negative
SCHEMA = {"layer": pl.Int32, "unit": pl.Int32, "variant": pl.String, "explanation_id": pl.String,
          "donor_unit": pl.Int32, **dict.fromkeys(AUROCS, pl.Float64), **dict.fromkeys(COUNTS, pl.Int32),
          "embedding_model": pl.String, "code_version": pl.String, "error": pl.String}


@dataclass
class Embedded:
    rows: list[dict]  # rows of SCHEMA
    seconds: float
    model_seconds: float


def unscored_row(base: dict, error: str) -> dict:
    """The row of an explanation that could not be scored: NaN AUROCs (never 0), zero counts."""
    return {**base, **dict.fromkeys(AUROCS, float("nan")), **dict.fromkeys(COUNTS, 0), "error": error}


def unit_excerpts(kinds: dict, tokens: dict[int, list[str]]) -> tuple[list[str], list[str]]:
    """The excerpts of one unit with records `kinds` ({kind: [(seq_id, activations)]}), as detection
    picks them: the valid + test top records, then up to NEGATIVES random and hard negatives that do
    not activate; (texts as the judge reads them, kind of each). ValueError when it has too few
    top records."""
    examples = detection_examples(*scored_records(kinds))
    return [excerpt_text(tokens[e["seq_id"]]) for e in examples], [e["kind"] for e in examples]


def embed_unit(explained: list[dict], bases: list[dict], kinds: dict, tokens: dict[int, list[str]], embedder,
               clock: ModelClock) -> list[dict]:
    """The rows of one unit's variants (`explained`: its rows of explanation_variants; `bases`: the
    identifying columns of each row): its excerpts and its explanations embedded in one call."""
    try:
        texts, excerpt_kinds = unit_excerpts(kinds, tokens)
    except ValueError as e:
        return [unscored_row(base, f"not enough records: {e}") for base in bases]
    scored = [i for i, e in enumerate(explained) if e["error"] is None]
    try:
        with clock.running():
            vectors = embedder.embed(texts + [explained[i]["text"] for i in scored])
    except Exception as e:  # a failed model call fails this unit's rows, never the shard
        return [unscored_row(base, f"embedding failed: {type(e).__name__}: {e}") for base in bases]
    excerpts, explanations = vectors[:len(texts)], dict(zip(scored, vectors[len(texts):]))
    counts = {f"n_{kind}": excerpt_kinds.count(kind) for kind in KINDS}
    rows = []
    for i, (e, base) in enumerate(zip(explained, bases)):
        if i not in explanations:
            rows.append(unscored_row(base, f"no explanation: {e['error']}"))
            continue
        aurocs = embedding_aurocs(explanations[i], excerpts, excerpt_kinds)
        rows.append({**base, **{column: aurocs[key] for column, key in AUROCS.items()}, **counts, "error": None})
    return rows


def embed_units(explained: pl.DataFrame, records: dict, tokens: dict[int, list[str]], embedder, code_version: str,
                report: Callable[[ProgressState], None] = print, what: str = "embedding") -> Embedded:
    """Score every row of `explained` (explanation_variants: layer, neuron, variant, explanation_id,
    donor_unit, text, error) on its unit's `records` ({unit: {kind: [(seq_id, activations)]}}) and
    the corpus `tokens`; `embedder` has `embed(texts) -> unit vectors` and a `label`."""
    units = explained.partition_by("unit", maintain_order=True, as_dict=True)
    progress = Progress(report, len(units), what, "units")
    clock = ModelClock()
    rows = []
    for (unit,), group in units.items():
        variants = group.to_dicts()
        bases = [{"layer": e["layer"], "unit": e["unit"], "variant": e["variant"],
                  "explanation_id": e["explanation_id"], "donor_unit": e["donor_unit"],
                  "embedding_model": embedder.label, "code_version": code_version} for e in variants]
        rows += embed_unit(variants, bases, records.get(unit, {}), tokens, embedder, clock)
        progress.advance()
    return Embedded(rows, progress.seconds, clock.seconds)
