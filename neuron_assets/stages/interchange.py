"""The interchange stage: our neurons to the published per-neuron JSON files and back
(docs/method.md, Interchange; method/interchange.py builds and reads the objects).

Export: per scored neuron of a layer, its records and stats (`collated-activations/...json`) and
each real variant's explanation with its valid-split simulations and scores (`explanations/...jsonl`).
Import: per neuron of a shard, the first explanation of its explanations file under a root, as an
'imported' row of the explanations table; a missing or malformed file is a row with an error."""

import hashlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import polars as pl
from upath import UPath

from neuron_assets.method.interchange import dumps, file_paths, neuron_record, read_explanations, simulation_results
from neuron_assets.resources.files import s3_errors
from neuron_assets.stages.explain import explanation_row
from neuron_assets.stages.records import records_of
from neuron_assets.stages.score import CALIBRATION_ROWS, with_split
from neuron_assets.stages.variants import CONTROL_ROWS

IMPORT_SETTING = "NEURON_ASSETS_IMPORT_FROM"
EXPORT_ORDER = ("llm", "revised", "token_baseline", "imported")  # the first is what an importer takes
SCORES = ("score_all", "rsquared", "abs_dev_explained")  # the pooled scores written per explanation


@dataclass
class Imported:
    rows: list[dict]  # rows of the explanations SCHEMA, code_version filled in
    reported_scores: list[float | None]  # per row, the score its file reports (None: none, or not read)


def _imported(root: str, layer: int, neuron: int) -> tuple[dict, float | None]:
    """The neuron's 'imported' row (explanation_row; its prompt_version is the file's sha256, 16 hex
    digits) and the score its file reports. A file that is missing, malformed or about another neuron
    gives an error row and no score; an empty explanation, an error row and the file's score."""
    path = UPath(root) / file_paths(layer, neuron)[1]
    model = f"imported from {root}"
    with s3_errors(str(path), "read", IMPORT_SETTING):
        text = path.read_text(encoding="utf-8") if path.exists() else None
    if text is None:
        error = f"no file {path}: export it there or change {IMPORT_SETTING}"
        return explanation_row(layer, neuron, "imported", None, model, "", None, error=error), None
    digest = hashlib.sha256(text.encode()).hexdigest()[:16]  # the file's version, in the lineage
    try:
        first = read_explanations(text, str(path))[0]
        if first["neuron_id"] != (layer, neuron):
            raise ValueError(f"{path}: holds neuron {first['neuron_id']}, expected ({layer}, {neuron})")
    except (ValueError, IndexError) as e:
        message = str(e) if isinstance(e, ValueError) else f"{path}: no explanation in the file"
        return explanation_row(layer, neuron, "imported", None, model, digest, None, error=message), None
    error = None if first["explanation"] else f"{path}: empty explanation"
    row = explanation_row(layer, neuron, "imported", first["explanation"] or None, model, digest, None, error=error)
    return row, first["score"]


def import_explanations(root: str, layer: int, neurons: list[int], code_version: str) -> Imported:
    """Each of `neurons`' first explanation in `explanations/<layer>/<neuron>.jsonl` under `root`
    (a local folder or s3:// URL in the published layout)."""
    rows, reported = [], []
    for neuron in neurons:
        row, score = _imported(root, layer, neuron)
        rows.append({**row, "code_version": code_version})
        reported.append(score)
    return Imported(rows, reported)


def variant_order(variant: str) -> tuple[int, str]:
    """Sort key of the exported variants: EXPORT_ORDER first, then any other by name."""
    return (EXPORT_ORDER.index(variant) if variant in EXPORT_ORDER else len(EXPORT_ORDER), variant)


def _scored(scores: pl.DataFrame, sims: pl.DataFrame, truth: dict, tokens: dict) -> list[dict]:
    """One neuron's explanations with their valid-split simulations (top records first), in
    EXPORT_ORDER; `truth` holds its real activations as {kind: {seq_id: activations}}. The
    calibration split is not exported: it is not scored."""
    out = []
    for row in sorted(scores.iter_rows(named=True), key=lambda r: variant_order(r["variant"])):
        mine = with_split(sims).filter((pl.col("variant") == row["variant"]) & pl.col("expected").is_not_null()
                                       & ~CALIBRATION_ROWS)
        if row["explanation"] is None or mine.height == 0:
            continue
        sequences = [{"tokens": tokens[s], "expected": np.asarray(e, np.float32), "true": truth[kind][s]}
                     for kind, s, e in mine.sort("kind", descending=True).select("kind", "seq_id", "expected")
                     .iter_rows()]
        out.append({"explanation": row["explanation"], "sequences": sequences, "scores": {k: row[k] for k in SCORES}})
    return out


@dataclass
class Exported:
    neurons: int
    variants: list[str]  # the variants exported, in EXPORT_ORDER


def export_neurons(layer: int, scores: pl.DataFrame, sims: pl.DataFrame, records: pl.DataFrame,
                   stats: pl.DataFrame, tokens: dict[int, list[str]], write: Callable[[str, str], None]) -> Exported:
    """Hands `write(relative path, text)` the two files of every neuron in `scores` (the layer's
    scores; controls are not exported), one neuron at a time: its records and `stats` row, and its
    explanations with their `sims` (simulations) and scores. `tokens`: the corpus tokens by seq_id."""
    scores, sims = scores.filter(~CONTROL_ROWS), sims.filter(~CONTROL_ROWS)
    neurons = sorted(scores["unit"].unique().to_list())
    stats_of = {r["unit"]: r for r in stats.filter(pl.col("unit").is_in(neurons)).iter_rows(named=True)}
    for neuron, kinds in records_of(records, neurons).items():
        quantiles = sorted(k for k in kinds if k.startswith("quantile_"))
        record = neuron_record(layer, neuron, [(tokens[s], a) for s, a in kinds.get("top", [])],
                               [(tokens[s], a) for s, a in kinds.get("random", [])],
                               [[(tokens[s], a) for s, a in kinds[q]] for q in quantiles], stats_of[neuron])
        truth = {kind: dict(pairs) for kind, pairs in kinds.items()}
        results = simulation_results(layer, neuron, _scored(scores.filter(pl.col("unit") == neuron),
                                                            sims.filter(pl.col("unit") == neuron), truth, tokens))
        for relative, obj in zip(file_paths(layer, neuron), (record, results)):
            write(relative, dumps(obj) + "\n")
    return Exported(len(neurons), sorted(set(scores["variant"]), key=variant_order))
