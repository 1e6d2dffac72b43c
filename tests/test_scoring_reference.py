"""Our scores and exports as the published reference implementation (OpenAI's neuron-explainer)
computes and reads them, on arrays small enough to score by hand:

- a failed token (no value 0-10 in the simulator's distribution) scores as an expected value of 0
  (NEURON_ASSETS_FAILED_TOKENS=zero, the default) or is left out (drop);
- rsquared and abs_dev_explained are of the valid simulation mapped by the least-squares line
  fitted on the calibration split; the correlations are of the simulation as it is;
- the exported files hold only the published enum values, the published fields and finite numbers,
  and their scores are the scores table's.
"""

import json
import math

import numpy as np
import polars as pl
import pytest

from neuron_assets.method.scoring import (FAILED_TOKEN_RULES, correlation, linear_calibration, score_neuron,
                                          score_neurons)
from neuron_assets.settings import SETTINGS, SOURCES
from neuron_assets.stages.capture import RECORDS_SCHEMA, STATS_SCHEMA
from neuron_assets.stages.interchange import export_neurons, import_explanations
from neuron_assets.stages.records import records_hash, records_of
from neuron_assets.stages.score import SCHEMA, score_units
from neuron_assets.stages.simulate import SCHEMA as SIMULATIONS

NAN = float("nan")
# the simulations table with its split column (whether or not stages/simulate.py declares it yet)
SIMULATIONS_WITH_SPLIT = {**SIMULATIONS, "split": pl.String}

# One sequence of 4 tokens whose third token failed: real r, simulated p.
REAL = np.array([0.0, 1.0, 2.0, 3.0])
SIMULATED = np.array([0.0, 2.0, NAN, 6.0])
# drop: r = (0, 1, 3), p = (0, 2, 6) = 2r, so r = 1 exactly.
DROPPED_R = 1.0
# zero: r = (0, 1, 2, 3), p = (0, 2, 0, 6); means 1.5 and 2;
# r - 1.5 = (-1.5, -0.5, 0.5, 1.5), p - 2 = (-2, 0, -2, 4);
# sum of products 3 + 0 - 1 + 6 = 8; sums of squares 5 and 24: r = 8 / sqrt(120) = 4 / sqrt(30).
ZEROED_R = 4 / math.sqrt(30)


def test_a_failed_token_counts_as_zero_by_default_and_can_be_dropped():
    assert FAILED_TOKEN_RULES[0] == "zero"
    assert correlation([REAL], [SIMULATED]) == pytest.approx(ZEROED_R, abs=1e-12)
    assert correlation([REAL], [SIMULATED], "zero") == pytest.approx(ZEROED_R, abs=1e-12)
    assert correlation([REAL], [SIMULATED], "drop") == pytest.approx(DROPPED_R, abs=1e-12)
    # the same in score_neuron (top: the sequence; random: a perfect one) and in score_neurons,
    # where NaN in both real and simulated is padding, not a failed token
    random_real, random_sim = np.array([1.0, 0.0]), np.array([1.0, 0.0])
    for rule, expected_top in (("zero", ZEROED_R), ("drop", DROPPED_R)):
        one = score_neuron([REAL], [SIMULATED], [random_real], [random_sim], rule)
        assert one["score_top"] == pytest.approx(expected_top, abs=1e-12)
        assert one["n_failed_tokens"] == 1
        padded = np.array([[*REAL, NAN], [*REAL, 1.0]]), np.array([[*SIMULATED, NAN], [*SIMULATED, 1.0]])
        many = score_neurons(padded[0], padded[1], np.tile(random_real, (2, 1)), np.tile(random_sim, (2, 1)), rule)
        assert many["score_top"][0] == pytest.approx(expected_top, abs=1e-12)
        assert many["n_failed_tokens"].tolist() == [1, 1]


def test_the_setting_enters_the_scoring_source_only():
    setting = next(s for s in SETTINGS if s.env == "NEURON_ASSETS_FAILED_TOKENS")
    assert (setting.default, setting.choices, setting.enters) == ("zero", FAILED_TOKEN_RULES, "scoring")
    assert "scoring" in SOURCES
    with pytest.raises(ValueError, match="NEURON_ASSETS_FAILED_TOKENS='skip': use 'zero' or 'drop'"):
        setting.parse("skip")


def test_linear_calibration_is_the_least_squares_line():
    # real = 2 * simulated + 1 exactly
    assert linear_calibration([np.array([1.0, 3.0]), np.array([5.0])], [np.array([0.0, 1.0]), np.array([2.0])]) == (
        pytest.approx(2.0), pytest.approx(1.0))
    # a failed token: real (1, 3, 5, 7), simulated (0, 1, 2, NaN)
    real, simulated = [np.array([1.0, 3.0, 5.0, 7.0])], [np.array([0.0, 1.0, 2.0, NAN])]
    assert linear_calibration(real, simulated, "drop") == (pytest.approx(2.0), pytest.approx(1.0))
    # zero: p = (0, 1, 2, 0), means 0.75 and 4; p - 0.75 = (-0.75, 0.25, 1.25, -0.75), r - 4 = (-3, -1, 1, 3);
    # slope = (2.25 - 0.25 + 1.25 - 2.25) / (0.5625 + 0.0625 + 1.5625 + 0.5625) = 1 / 2.75 = 4/11;
    # intercept = 4 - 4/11 * 0.75 = 41/11
    assert linear_calibration(real, simulated) == (pytest.approx(4 / 11), pytest.approx(41 / 11))
    # a constant (or too short) simulation determines no line
    assert all(math.isnan(v) for v in linear_calibration([np.array([1.0, 2.0])], [np.array([3.0, 3.0])]))
    assert all(math.isnan(v) for v in linear_calibration([], []))


# Records of unit 0: valid = top 0 and random 5, calibration = top 1 and random 6 (2 tokens each).
RECORDS = {0: {"top": [(0, np.array([1.0, 3.0], np.float32)), (1, np.array([1.0, 3.0], np.float32))],
               "random": [(5, np.array([5.0, 9.0], np.float32)), (6, np.array([5.0, 7.0], np.float32))]}}
VALID = {0: [0.0, 1.0], 5: [2.0, 3.0]}  # valid simulation: real (1, 3, 5, 9) against p = (0, 1, 2, 3)
# score_all: means 4.5 and 1.5; r - 4.5 = (-3.5, -1.5, 0.5, 4.5), p - 1.5 = (-1.5, -0.5, 0.5, 1.5);
# sum of products 5.25 + 0.75 + 0.25 + 6.75 = 13; sums of squares 35 and 5: r = 13 / sqrt(175).
SCORE_ALL = 13 / math.sqrt(175)
# calibrated by (2, 1): p' = (1, 3, 5, 7), r - p' = (0, 0, 0, 2); mean(r^2) = (1 + 9 + 25 + 81) / 4 = 29,
# mean(|r|) = 4.5: rsquared = 1 - (4 / 4) / 29 = 28/29, abs_dev_explained = 1 - (2 / 4) / 4.5 = 8/9
CALIBRATED = (28 / 29, 8 / 9)
# uncalibrated: r - p = (1, 2, 3, 6): rsquared = 1 - (50 / 4) / 29 = 33/58, abs_dev = 1 - (12 / 4) / 4.5 = 1/3
UNCALIBRATED = (33 / 58, 1 / 3)


def sim_rows(variant: str, calibration: dict | None, layer: int = 0) -> list[dict]:
    """Rows of unit 0's variant: VALID, then the calibration split's simulation by seq_id (if any)."""
    rows = []
    for split, sims in (("valid", VALID), ("calibration", calibration or {})):
        for seq_id, expected in sims.items():
            rows.append({"layer": layer, "unit": 0, "variant": variant, "explanation_id": f"e-{variant}",
                         "seq_id": seq_id, "split": split, "kind": "top" if seq_id < 5 else "random",
                         "expected": expected, "n_failed_tokens": int(np.isnan(expected).sum()),
                         "simulator_model": "sim", "method": "all_at_once", "cost_usd": 0.01, "error": None})
    return rows


def explanations(variants: list[str]) -> pl.DataFrame:
    return pl.DataFrame({"explanation_id": [f"e-{v}" for v in variants], "text": [f"{v} text" for v in variants],
                         "cost_usd": [0.5] * len(variants), "donor_unit": [None] * len(variants)},
                        schema_overrides={"donor_unit": pl.Int32})


def test_the_score_stage_calibrates_rsquared_and_abs_dev_on_the_calibration_split():
    rows = [*sim_rows("llm", {1: [0.0, 1.0], 6: [2.0, 3.0]}),  # calibration real = 2 p + 1 exactly
            *sim_rows("token_baseline", None),  # no calibration rows
            *sim_rows("revised", {1: [2.0, 2.0], 6: [2.0, 2.0]}),  # constant: no line
            *sim_rows("imported", {1: [0.0, 1.0], 6: [2.0, NAN]})]  # calibration with a failed token
    table = score_units(pl.DataFrame(rows, schema=SIMULATIONS_WITH_SPLIT),
                        explanations(["llm", "token_baseline", "revised", "imported"]), RECORDS)
    assert table.schema == pl.Schema(SCHEMA)
    by = {r["variant"]: r for r in table.iter_rows(named=True)}
    for variant, calibrated, (rsq, abs_dev) in (("llm", True, CALIBRATED), ("token_baseline", False, UNCALIBRATED),
                                                ("revised", False, UNCALIBRATED)):
        row = by[variant]
        assert row["calibrated"] is calibrated, variant
        assert (row["rsquared"], row["abs_dev_explained"]) == (pytest.approx(rsq), pytest.approx(abs_dev)), variant
        assert row["score_all"] == pytest.approx(SCORE_ALL), variant  # the correlation is not calibrated
        assert row["score_top"] == pytest.approx(1.0) and row["score_random"] == pytest.approx(1.0)
        assert row["n_failed_tokens"] == 0 and row["error"] is None
    # the calibration's failed token counts as 0: the line through real (1, 3, 5, 7) and p (0, 1, 2, 0)
    # is slope 4/11, intercept 41/11 (test_linear_calibration_is_the_least_squares_line)
    slope, intercept = 4 / 11, 41 / 11
    mapped = slope * np.array([0.0, 1.0, 2.0, 3.0]) + intercept
    real = np.array([1.0, 3.0, 5.0, 9.0])
    assert by["imported"]["calibrated"] is True
    assert by["imported"]["rsquared"] == pytest.approx(1 - np.mean((real - mapped) ** 2) / 29)
    assert by["imported"]["n_failed_tokens"] == 0  # counted on the valid split only
    # records_hash is of the scored (valid) records only, as the audit recomputes it
    assert by["llm"]["records_hash"] == records_hash([(0, RECORDS[0]["top"][0][1]), (5, RECORDS[0]["random"][0][1])])
    # the calibration's simulations cost too: explainer 0.5 + 4 sequences x 0.01
    assert by["llm"]["cost_usd"] == pytest.approx(0.54) and by["token_baseline"]["cost_usd"] == pytest.approx(0.52)


def test_the_score_stage_applies_the_failed_token_rule_and_reads_tables_without_split():
    records = {0: {"top": [(0, np.array([0.0, 1.0], np.float32))], "random": [(5, np.array([2.0, 3.0], np.float32))]}}
    rows = [{"layer": 0, "unit": 0, "variant": "llm", "explanation_id": "e-llm", "seq_id": seq_id, "kind": kind,
             "expected": expected, "n_failed_tokens": failed, "simulator_model": "sim", "method": "all_at_once",
             "cost_usd": 0.0, "error": None}
            for seq_id, kind, expected, failed in ((0, "top", [0.0, 2.0], 0), (5, "random", [NAN, 6.0], 1))]
    old_table = pl.DataFrame(rows, schema={c: t for c, t in SIMULATIONS.items() if c != "split"})
    # real (0, 1, 2, 3) against (0, 2, NaN, 6): the sequence of the first test, split in two
    for rule, expected in (("zero", ZEROED_R), ("drop", DROPPED_R)):
        row = score_units(old_table, explanations(["llm"]), records, rule).row(0, named=True)
        assert row["score_all"] == pytest.approx(expected, abs=1e-12), rule
        assert row["n_failed_tokens"] == 1 and row["calibrated"] is False and row["error"] is None
    # zero: rsquared = 1 - mean((0, -1, 2, -3)^2) / mean((0, 1, 2, 3)^2) = 1 - 3.5 / 3.5 = 0
    assert score_units(old_table, explanations(["llm"]), records)["rsquared"][0] == pytest.approx(0.0)


# ---------------------------------------------------------------------------------------------
# the export, checked against the published dataclasses' fields and enum

# The fields of each published dataclass that our files carry (besides dataclass_name); the
# published loader passes every key to the class, so a key outside these would not load.
FIELDS = {
    "NeuronId": {"layer_index", "neuron_index"},
    "ActivationRecord": {"tokens", "activations"},
    "NeuronRecord": {"neuron_id", "random_sample", "random_sample_by_quantile", "quantile_boundaries", "mean",
                     "variance", "skewness", "kurtosis", "most_positive_activation_records"},
    "SequenceSimulation": {"tokens", "expected_activations", "activation_scale", "distribution_values",
                           "distribution_probabilities"},
    "ScoredSequenceSimulation": {"simulation", "true_activations", "ev_correlation_score", "rsquared_score",
                                 "absolute_dev_explained_score"},
    "ScoredSimulation": {"scored_sequence_simulations", "ev_correlation_score", "rsquared_score",
                         "absolute_dev_explained_score"},
    "ScoredExplanation": {"explanation", "scored_simulation"},
    "NeuronSimulationResults": {"neuron_id", "scored_explanations"},
}
OPTIONAL = {"SequenceSimulation": {"uncalibrated_simulation"}}
ACTIVATION_SCALES = {"neuron_activations", "simulated_normalized_activations"}
NUMBER_LISTS = {"activations", "expected_activations", "true_activations"}  # finite numbers only
SCORE_FIELDS = {"ev_correlation_score", "rsquared_score", "absolute_dev_explained_score"}  # Optional[float]


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def published_problems(obj, where: str = "$") -> list[str]:
    """What the published readers would not accept in a parsed export: every object named by a
    known dataclass_name with exactly its fields, activation_scale one of the enum's values,
    activations and expected values finite numbers (no null), scores numbers or null."""
    problems = []
    if isinstance(obj, list):
        for i, item in enumerate(obj):
            problems += published_problems(item, f"{where}[{i}]")
        return problems
    if not isinstance(obj, dict):
        return problems
    name = obj.get("dataclass_name")
    if name not in FIELDS:
        return [f"{where}: dataclass_name {name!r}"]
    keys = set(obj) - {"dataclass_name"}
    if not FIELDS[name] <= keys <= FIELDS[name] | OPTIONAL.get(name, set()):
        problems.append(f"{where}: {name} keys {sorted(keys)}")
    if name == "SequenceSimulation" and obj.get("activation_scale") not in ACTIVATION_SCALES:
        problems.append(f"{where}: activation_scale {obj.get('activation_scale')!r}")
    for key, value in obj.items():
        if key in NUMBER_LISTS and not all(is_number(v) and math.isfinite(v) for v in value):
            problems.append(f"{where}.{key}: not all finite numbers: {value}")
        elif key in SCORE_FIELDS and not (value is None or is_number(value)):
            problems.append(f"{where}.{key}: {value!r}")
        else:
            problems += published_problems(value, f"{where}.{key}")
    return problems


def test_the_validator_finds_what_the_published_readers_reject():
    good = {"dataclass_name": "SequenceSimulation", "tokens": ["a"], "expected_activations": [1.0],
            "activation_scale": "simulated_normalized_activations", "distribution_values": [[]],
            "distribution_probabilities": [[]]}
    assert published_problems(good) == []
    assert published_problems({**good, "activation_scale": "simulated_activations"})
    assert published_problems({**good, "expected_activations": [None]})
    assert published_problems({**good, "extra": 1}) and published_problems({**good, "dataclass_name": "Sim"})


def test_the_export_holds_published_values_and_the_scores_tables_numbers(tmp_path):
    # unit 0 of layer 3 with a failed valid token (top 0's second token) and a calibration split
    valid_with_failure = {0: [0.0, NAN], 5: [2.0, 3.0]}
    rows = [*sim_rows("llm", {1: [0.0, 1.0], 6: [2.0, 3.0]}, layer=3)]
    for row in rows:
        if row["split"] == "valid":
            row["expected"] = valid_with_failure[row["seq_id"]]
            row["n_failed_tokens"] = int(np.isnan(row["expected"]).sum())
    sims = pl.DataFrame(rows, schema=SIMULATIONS_WITH_SPLIT)
    records = pl.DataFrame([{"unit": 0, "kind": kind, "rank": rank, "seq_id": seq_id, "activations": acts.tolist()}
                            for kind, pairs in RECORDS[0].items() for rank, (seq_id, acts) in enumerate(pairs)],
                           schema=RECORDS_SCHEMA)
    stats = pl.DataFrame([{"unit": 0, "mean": 0.5, "variance": 1.0, "skewness": NAN, "kurtosis": 0.0,
                           "quantile_boundaries": [0.5]}], schema=STATS_SCHEMA)
    tokens = {s: [f"t{s}a", f"t{s}b"] for s in (0, 1, 5, 6)}
    scores = score_units(sims, explanations(["llm"]), records_of(records, [0]))
    written = {}

    def write(relative, text):
        written[relative] = text
        (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / relative).write_text(text)

    export_neurons(3, scores, sims, records, stats, tokens, write)
    assert sorted(written) == ["collated-activations/3/0.json", "explanations/3/0.jsonl"]
    for text in written.values():
        assert published_problems(json.loads(text)) == []

    results = json.loads(written["explanations/3/0.jsonl"])
    simulation = results["scored_explanations"][0]["scored_simulation"]
    sequences = simulation["scored_sequence_simulations"]
    assert [s["simulation"]["activation_scale"] for s in sequences] == ["simulated_normalized_activations"] * 2
    # the valid split only (top first), the failed token written as 0
    assert [s["simulation"]["tokens"] for s in sequences] == [tokens[0], tokens[5]]
    assert [s["simulation"]["expected_activations"] for s in sequences] == [[0.0, 0.0], [2.0, 3.0]]
    row = scores.row(0, named=True)
    assert row["calibrated"] is True and row["n_failed_tokens"] == 1
    assert (simulation["ev_correlation_score"], simulation["rsquared_score"],
            simulation["absolute_dev_explained_score"]) == (row["score_all"], row["rsquared"], row["abs_dev_explained"])
    # the pooled correlation is that of the exported numbers, as the reference's aggregation computes it
    true = np.concatenate([s["true_activations"] for s in sequences])
    expected = np.concatenate([s["simulation"]["expected_activations"] for s in sequences])
    assert row["score_all"] == pytest.approx(np.corrcoef(true, expected)[0, 1], abs=1e-12)

    imported = import_explanations(str(tmp_path), 3, [0], "c1")
    assert [(r["text"], r["error"]) for r in imported.rows] == [("llm text", None)]
    assert imported.reported_scores == [pytest.approx(row["score_all"])]
