"""The per-neuron JSON files of OpenAI's published neuron explanations (docs/method.md, Interchange).

Two files per neuron, under the same relative paths as the published data:
- `collated-activations/{layer}/{neuron}.json`: one NeuronRecord (records and statistics);
- `explanations/{layer}/{neuron}.jsonl`: one line holding a NeuronSimulationResults
  (explanations with their simulations and scores).
Every object carries a `"dataclass_name"` field naming its class, as the published files do.
Activations and expected values are numbers only: a failed token is written as an expected value
of 0, the published reference's rule (its aggregation reads no null).

This module builds those objects from plain data and reads them back; it does no file I/O (the
caller reads and writes the text). `dumps` writes strict JSON: NaN and infinities become null.
The readers accept files without `dataclass_name` fields, and NaN literals as written by Python's
json module, but require every field they use; anything else raises ValueError naming the file.
"""

import json
import math

import numpy as np

from neuron_assets.method.prompts import clean_explanation
from neuron_assets.method.scoring import absolute_dev_explained, correlation, fill_failed, rsquared

# The unit of SequenceSimulation.expected_activations: the simulator's 0-10 scale (the published
# enum's other value, "neuron_activations", is for real or calibrated activations).
ACTIVATION_SCALE = "simulated_normalized_activations"


def file_paths(layer: int, neuron: int) -> tuple[str, str]:
    """(records path, explanations path) relative to the export root, with the layer and neuron
    numbers unpadded, as published: ("collated-activations/0/5.json", "explanations/0/5.jsonl")."""
    layer, neuron = int(layer), int(neuron)
    return f"collated-activations/{layer}/{neuron}.json", f"explanations/{layer}/{neuron}.jsonl"


# ---------------------------------------------------------------------------------------------
# export


def _neuron_id(layer: int, neuron: int) -> dict:
    return {"dataclass_name": "NeuronId", "layer_index": int(layer), "neuron_index": int(neuron)}


def _floats(values) -> list[float]:
    """A 1-D array as a list of Python floats. A float32 value becomes the float64 with the same
    value, so reading it back as float32 is exact. NaN stays NaN here; `dumps` writes it as null."""
    return [float(v) for v in np.asarray(values).ravel()]


def activation_record(tokens: list[str], activations) -> dict:
    """{"dataclass_name": "ActivationRecord", "tokens": [str], "activations": [float]}."""
    if len(tokens) != np.asarray(activations).size:
        raise ValueError(f"{len(tokens)} tokens but {np.asarray(activations).size} activations")
    return {"dataclass_name": "ActivationRecord", "tokens": [str(t) for t in tokens], "activations": _floats(activations)}


def neuron_record(layer: int, neuron: int, top: list, random: list, quantiles: list[list], stats: dict) -> dict:
    """The NeuronRecord of one neuron, for `collated-activations/{layer}/{neuron}.json`.

    top, random: records as (tokens [str], activations array [T]), top in rank order; quantiles:
    one such list per quantile bucket, lowest bucket first; stats: mean, variance, skewness,
    kurtosis (floats) and quantile_boundaries ([float]); other keys are ignored."""

    def records(rows):
        return [activation_record(tokens, acts) for tokens, acts in rows]

    return {
        "dataclass_name": "NeuronRecord",
        "neuron_id": _neuron_id(layer, neuron),
        "random_sample": records(random),
        "random_sample_by_quantile": [records(bucket) for bucket in quantiles],
        "quantile_boundaries": _floats(stats["quantile_boundaries"]),
        "mean": float(stats["mean"]),
        "variance": float(stats["variance"]),
        "skewness": float(stats["skewness"]),
        "kurtosis": float(stats["kurtosis"]),
        "most_positive_activation_records": records(top),
    }


def _scored_sequence(tokens: list[str], expected, true) -> dict:
    """One ScoredSequenceSimulation; its three scores are those of this sequence alone, of the
    0-10 values written (a failed token as 0). Only expected values are kept: distribution_values
    and distribution_probabilities hold one empty list per token."""
    expected, true = np.asarray(expected, np.float32).ravel(), np.asarray(true, np.float32).ravel()
    if not len(tokens) == len(expected) == len(true):
        raise ValueError(f"{len(tokens)} tokens, {len(expected)} expected and {len(true)} true activations")
    expected = fill_failed(true, expected, "zero")
    simulation = {
        "dataclass_name": "SequenceSimulation",
        "tokens": [str(t) for t in tokens],
        "expected_activations": _floats(expected),
        "activation_scale": ACTIVATION_SCALE,
        "distribution_values": [[] for _ in tokens],
        "distribution_probabilities": [[] for _ in tokens],
    }
    return {
        "dataclass_name": "ScoredSequenceSimulation",
        "simulation": simulation,
        "true_activations": _floats(true),
        "ev_correlation_score": correlation([true], [expected]),
        "rsquared_score": rsquared([true], [expected]),
        "absolute_dev_explained_score": absolute_dev_explained([true], [expected]),
    }


def _continuation(explanation: str) -> str:
    """The explanation as published: a continuation of "the main thing this neuron does is find",
    so with one leading space (the published simulator appends it to that phrase without one)."""
    text = explanation.strip()
    return " " + text if text else text


def simulation_results(layer: int, neuron: int, scored: list[dict]) -> dict:
    """The NeuronSimulationResults of one neuron, for `explanations/{layer}/{neuron}.jsonl`.

    scored: one item per explanation, {"explanation": str, "sequences": [{"tokens": [str],
    "expected": array [T] (simulated, 0-10; NaN = failed token, written as 0), "true": array [T]}],
    "scores": {"score_all", "rsquared", "abs_dev_explained"}}. The explanation-level scores are the
    given pooled ones (the scores table's; docs/method.md, Scores); each sequence's scores are
    computed here on that sequence alone.
    The explanation is written stripped, with one leading space (see `_continuation`)."""
    explanations = []
    for item in scored:
        sequences = [_scored_sequence(s["tokens"], s["expected"], s["true"]) for s in item["sequences"]]
        scores = item["scores"]
        simulation = {
            "dataclass_name": "ScoredSimulation",
            "scored_sequence_simulations": sequences,
            "ev_correlation_score": float(scores["score_all"]),
            "rsquared_score": float(scores["rsquared"]),
            "absolute_dev_explained_score": float(scores["abs_dev_explained"]),
        }
        explanations.append(
            {
                "dataclass_name": "ScoredExplanation",
                "explanation": _continuation(item["explanation"]),
                "scored_simulation": simulation,
            }
        )
    return {
        "dataclass_name": "NeuronSimulationResults",
        "neuron_id": _neuron_id(layer, neuron),
        "scored_explanations": explanations,
    }


def _finite_or_none(obj):
    """A copy of obj (dicts, lists, tuples, floats, numpy values) with NaN and +-inf as None."""
    if isinstance(obj, dict):
        return {str(k): _finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, np.ndarray)):
        return [_finite_or_none(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def dumps(obj) -> str:
    """Strict JSON text on one line, without a trailing newline: NaN and infinities are written as
    null (Python's json would write NaN, which strict readers reject). Non-ASCII characters are
    escaped (\\uXXXX), so the text is ASCII and no character inside a string (such as U+2028) can
    be mistaken for a line break by a JSON-lines reader."""
    return json.dumps(_finite_or_none(obj), allow_nan=False)


# ---------------------------------------------------------------------------------------------
# import


def _parse(text: str, where: str) -> list[tuple[str, object]]:
    """[(where, value)] for the JSON values of a text holding one JSON document (any layout) or
    JSON lines (blank lines ignored; where then names the line). Lines are split on "\\n" only,
    not on every Unicode line separator."""
    if not text.strip():
        raise ValueError(f"{where}: empty, expected a JSON object")
    try:
        return [(where, json.loads(text))]
    except json.JSONDecodeError as error:
        whole = error
    values = []
    for i, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            values.append((f"{where}: line {i}", json.loads(line)))
        except json.JSONDecodeError as error:
            if not values and i < text.count("\n") + 1:  # probably one multi-line document
                raise ValueError(f"{where}: not JSON (as one document: {whole}; as JSON lines, line {i}: {error})")
            raise ValueError(f"{where}: line {i} is not JSON: {error}")
    return values


def _object(value, dataclass_name: str, where: str) -> dict:
    """value, checked to be a JSON object whose dataclass_name, if it has one, is dataclass_name."""
    if not isinstance(value, dict):
        raise ValueError(f"{where}: expected a {dataclass_name} object, got {type(value).__name__}")  # noqa: TRY004
    name = value.get("dataclass_name", dataclass_name)
    if name != dataclass_name:
        raise ValueError(f"{where}: is a {name}, expected {dataclass_name}")
    return value


def _field(obj: dict, field: str, kind, where: str, expected: str):
    """obj[field], checked to be an instance of kind (a bool is not a number)."""
    value = obj.get(field)
    if field not in obj or not isinstance(value, kind) or isinstance(value, bool):
        got = "missing" if field not in obj else f"got {json.dumps(value)[:40]}"
        raise ValueError(f"{where}: no '{field}' {expected} ({got})")
    return value


_NUMBER = (int, float)


def _number(obj: dict, field: str, where: str) -> float:
    """obj[field] as a float: a number, or null for NaN."""
    if obj.get(field, 0) is None:
        return float("nan")
    return float(_field(obj, field, _NUMBER, where, "number"))


def _read_neuron_id(obj: dict, where: str) -> tuple[int, int]:
    neuron_id = _object(_field(obj, "neuron_id", dict, where, "object"), "NeuronId", f"{where}: neuron_id")
    layer = _field(neuron_id, "layer_index", int, f"{where}: neuron_id", "integer")
    neuron = _field(neuron_id, "neuron_index", int, f"{where}: neuron_id", "integer")
    return layer, neuron


def read_explanations(text: str, where: str) -> list[dict]:
    """The explanations in the text of an explanations file (.jsonl: one NeuronSimulationResults
    per line; or .json: one object), in file order: [{"explanation": str, cleaned with
    `prompts.clean_explanation` (the published leading space and any restated prefix go),
    "score": the file's ev_correlation_score (float; None when null or NaN), "neuron_id":
    (layer, neuron)}]. where (the file's path) names the file in error messages.

    Required: neuron_id {layer_index, neuron_index}, scored_explanations [{explanation,
    scored_simulation {ev_correlation_score}}]; everything else is ignored."""
    out = []
    for at, value in _parse(text, where):
        results = _object(value, "NeuronSimulationResults", at)
        neuron_id = _read_neuron_id(results, at)
        explanations = _field(results, "scored_explanations", list, at, "list")
        for j, item in enumerate(explanations):
            here = f"{at}: scored_explanations[{j}]"
            item = _object(item, "ScoredExplanation", here)
            explanation = _field(item, "explanation", str, here, "string")
            simulation = _object(
                _field(item, "scored_simulation", dict, here, "object"), "ScoredSimulation", f"{here}.scored_simulation"
            )
            score = _number(simulation, "ev_correlation_score", f"{here}.scored_simulation")
            out.append(
                {
                    "explanation": clean_explanation(explanation),
                    "score": score if math.isfinite(score) else None,
                    "neuron_id": neuron_id,
                }
            )
    return out
