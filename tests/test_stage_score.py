"""The score stage as plain code, without Dagster: scores of simulations built here against known
activations, and the summaries of hand-written scores tables."""

import math

import numpy as np
import polars as pl
import pytest

from neuron_assets.stages.explain import SCHEMA as EXPLANATIONS
from neuron_assets.stages.explain import explanation_row
from neuron_assets.stages.records import records_hash
from neuron_assets.stages.results import Usage
from neuron_assets.stages.score import REPORT_COLUMNS, SCHEMA, quality_report, score_units, summarize
from neuron_assets.stages.simulate import SCHEMA as SIMULATIONS
from neuron_assets.stages.variants import explanation_variants

NAN = float("nan")
SEQUENCES = (("top", 0), ("top", 1), ("random", 5), ("random", 6))


def unit_records(unit: int) -> dict:
    """{kind: [(seq_id, activations)]}: 4 tokens per sequence, different for every unit and sequence."""
    rng = np.random.default_rng(unit)
    return {kind: [(s, rng.uniform(0, 3 if kind == "top" else 1, 4).astype(np.float32))
                   for k, s in SEQUENCES if k == kind] for kind in ("top", "random")}


RECORDS = {unit: unit_records(unit) for unit in (0, 1, 2)}
REAL = {unit: dict(pairs for kind in ("top", "random") for pairs in RECORDS[unit][kind]) for unit in RECORDS}


@pytest.fixture(scope="module")
def explanations() -> pl.DataFrame:
    """llm (0.5 USD each) and token_baseline explanations of units 0-2, with their shuffled controls."""
    rows = [explanation_row(0, unit, variant, f"{variant} of {unit}", "model", "p1", None,
                            Usage(cost_usd=0.5 if variant == "llm" else 0.0))
            for unit in (0, 1, 2) for variant in ("llm", "token_baseline")]
    return explanation_variants([pl.DataFrame(rows, schema=EXPLANATIONS)], "00|00-63", seed=0, control=True)


def simulated(explanations: pl.DataFrame, unit: int, variant: str, expected, cost_usd: float = 0.01,
              error: str | None = None) -> list[dict]:
    """Simulation rows of SEQUENCES for a unit's variant: expected(kind, seq_id, real) per sequence
    (None: that sequence failed with `error`)."""
    explanation_id = explanations.filter((pl.col("unit") == unit) & (pl.col("variant") == variant))["explanation_id"][0]
    rows = []
    for kind, seq_id in SEQUENCES:
        values = expected(kind, seq_id, REAL[unit][seq_id])
        rows.append({"layer": 0, "unit": unit, "variant": variant, "explanation_id": explanation_id,
                     "seq_id": seq_id, "kind": kind, "expected": None if values is None else list(values),
                     "n_failed_tokens": 0 if values is None else int(np.isnan(values).sum()),
                     "simulator_model": "sim", "method": "json", "cost_usd": cost_usd,
                     "error": error if values is None else None})
    return rows


def test_scores_are_the_pooled_correlation_of_simulated_with_real_activations(explanations):
    def partly_failed(kind, seq_id, real):  # top 1 fails, and top 0's token 2
        if seq_id == 1:
            return None
        return np.where((np.arange(4) == 2) & (seq_id == 0), NAN, 4 - real)

    rows = [*simulated(explanations, 0, "llm", lambda kind, s, real: 2 * real + 1),
            *simulated(explanations, 0, "token_baseline", lambda kind, s, real: 10 - real),
            *simulated(explanations, 1, "llm", lambda kind, s, real: np.full(4, 3.0)),  # constant simulation
            *simulated(explanations, 1, "token_baseline", partly_failed, error="simulator failed: timeout"),
            *simulated(explanations, 2, "llm", lambda kind, s, real: None, error="simulator unusable: down"),
            *simulated(explanations, 0, "llm_shuffled", lambda kind, s, real: real)]
    table = score_units(pl.DataFrame(rows, schema=SIMULATIONS), explanations, RECORDS)
    assert table.schema == pl.Schema(SCHEMA) and table.height == 6
    by = {(r["unit"], r["variant"]): r for r in table.iter_rows(named=True)}

    perfect = by[(0, "llm")]
    assert [perfect[c] for c in ("score_all", "score_top", "score_random")] == pytest.approx([1.0, 1.0, 1.0])
    assert perfect["rsquared"] < 1  # right shape, wrong scale
    assert perfect["explanation"] == "llm of 0" and perfect["error"] is None and perfect["donor_unit"] is None
    assert perfect["cost_usd"] == pytest.approx(0.5 + 4 * 0.01)  # explainer + simulator
    assert perfect["records_hash"] == records_hash([(s, REAL[0][s]) for _, s in SEQUENCES])
    assert by[(0, "token_baseline")]["score_all"] == pytest.approx(-1.0)

    constant = by[(1, "llm")]
    assert all(math.isnan(constant[c]) for c in ("score_all", "score_top", "score_random"))
    assert constant["error"] is None

    # one failed sequence and one failed token: scored on the other sequences, the failed token as
    # an expected value of 0 (the default rule), and both are counted
    partial = by[(1, "token_baseline")]
    assert partial["error"] == "1 of 4 sequences failed to simulate" and partial["n_failed_tokens"] == 1
    real = np.concatenate([REAL[1][0], REAL[1][5], REAL[1][6]])
    expected = np.where(np.arange(12) == 2, 0.0, 4 - real)
    assert partial["score_all"] == pytest.approx(np.corrcoef(real, expected)[0, 1])
    assert not any(by[key]["calibrated"] for key in by)  # no calibration rows
    assert partial["records_hash"] == records_hash([(s, REAL[1][s]) for s in (0, 5, 6)])

    failed = by[(2, "llm")]
    assert math.isnan(failed["score_all"]) and failed["error"] == "simulator unusable: down"
    assert failed["records_hash"] is None and failed["n_failed_tokens"] == 0

    # a control scores another unit's explanation, at no explainer cost
    control = by[(0, "llm_shuffled")]
    assert control["donor_unit"] in (1, 2) and control["explanation"] == f"llm of {control['donor_unit']}"
    assert control["cost_usd"] == pytest.approx(4 * 0.01) and control["score_all"] == pytest.approx(1.0)


def test_a_simulation_of_another_length_than_its_record_is_an_error(explanations):
    rows = simulated(explanations, 0, "llm", lambda kind, s, real: np.append(real, 1.0))
    with pytest.raises(ValueError, match="differ in length"):
        score_units(pl.DataFrame(rows, schema=SIMULATIONS), explanations, RECORDS)


def scores(rows: list[tuple]) -> pl.DataFrame:
    """A scores table from (neuron, variant, method, score_all, cost_usd, error) rows of layer 0."""
    return pl.DataFrame([{"layer": 0, "unit": n, "variant": v, "method": m, "score_all": s, "score_top": s,
                          "score_random": s, "cost_usd": c, "error": e} for n, v, m, s, c, e in rows], schema=SCHEMA)


SCORES = scores([
    (0, "llm", "json", 0.5, 1.0, None), (1, "llm", "json", 0.7, 1.0, None),
    (2, "llm", "json", NAN, 1.0, "1 of 10 sequences failed to simulate"), (3, "llm", "json", 0.9, 1.0, None),
    (0, "revised", "json", 0.6, 2.0, None), (1, "revised", "json", 0.9, 2.0, None),
    (2, "revised", "json", 0.8, 2.0, None), (3, "revised", "json", NAN, 2.0, None),
    (0, "llm_shuffled", "json", 0.1, 0.5, None), (1, "llm_shuffled", "json", -0.1, 0.5, None),
    (2, "llm_shuffled", "json", NAN, 0.5, None), (3, "llm_shuffled", "json", 0.3, 0.5, None),
    (0, "token_baseline", "json", 0.2, 0.0, None),
    (0, "llm", "all_at_once", 0.3, 1.0, None),  # another simulation method: never pooled with json
])


def test_summary_folds_controls_into_their_variant_and_gains_over_llm_from_pairs():
    summary = summarize(SCORES)
    by = {(r["variant"], r["method"]): r for r in summary.iter_rows(named=True)}
    assert sorted(by) == [("llm", "all_at_once"), ("llm", "json"), ("revised", "json"), ("token_baseline", "json")]

    llm = by[("llm", "json")]
    assert (llm["units"], llm["scored"], llm["errors"]) == (4, 3, 1)
    assert llm["mean_score_all"] == pytest.approx(0.7) and llm["median_score_all"] == pytest.approx(0.7)
    assert llm["share_at_least_0.8"] == pytest.approx(1 / 3)
    assert llm["control_mean_score_all"] == pytest.approx(0.1) and llm["margin_over_control"] == pytest.approx(0.6)
    assert llm["gain_over_llm"] is None
    assert llm["cost_usd"] == pytest.approx(4 * 1.0 + 4 * 0.5)  # the variant's and its control's

    revised = by[("revised", "json")]
    assert revised["mean_score_all"] == pytest.approx((0.6 + 0.9 + 0.8) / 3)
    assert revised["control_mean_score_all"] is None and revised["margin_over_control"] is None
    # neurons 0 and 1 have both scores finite; the all_at_once llm score is not a pair
    assert revised["gain_over_llm"] == pytest.approx(((0.6 - 0.5) + (0.9 - 0.7)) / 2)
    assert by[("token_baseline", "json")]["gain_over_llm"] == pytest.approx(0.2 - 0.5)
    assert by[("llm", "all_at_once")]["mean_score_all"] == pytest.approx(0.3)


def test_summary_with_detection_scores_and_the_quality_report():
    json_only = SCORES.filter(pl.col("method") == "json")
    detection = pl.DataFrame({
        "layer": [0, 0, 0], "unit": [0, 1, 3], "variant": ["llm"] * 3,
        "detection": [0.6, 0.8, 1.0], "detection_random": [0.7, 0.9, 1.0], "detection_hard_negative": [NAN] * 3,
        "fuzzing": [0.5, 0.5, 0.8], "fuzzing_random": [0.5, 0.5, 0.8], "fuzzing_hard_negative": [0.4, NAN, 0.6],
        "cost_usd": [0.1, 0.1, 0.1]}, schema_overrides={"layer": pl.Int32, "unit": pl.Int32})
    summary = summarize(json_only, detection)
    llm = summary.filter(pl.col("variant") == "llm").row(0, named=True)
    assert llm["mean_detection"] == pytest.approx(0.8) and llm["mean_fuzzing_hard_negative"] == pytest.approx(0.5)
    assert math.isnan(llm["mean_detection_hard_negative"])  # no hard negatives anywhere: NaN, not null
    assert llm["r_detection"] == pytest.approx(1.0)  # detection rises with score_all, linearly
    assert llm["cost_usd"] == pytest.approx(6.0 + 3 * 0.1)
    revised = summary.filter(pl.col("variant") == "revised").row(0, named=True)
    assert revised["mean_detection"] is None and revised["cost_usd"] == pytest.approx(8.0)

    report = quality_report(summary)
    assert report.columns == [c for c in REPORT_COLUMNS if "embedding" not in c]
    assert quality_report(summarize(json_only)).columns == [c for c in REPORT_COLUMNS if "detection" not in c
                                                            and "fuzzing" not in c and "embedding" not in c]
