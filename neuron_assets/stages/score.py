"""The score stage: per (unit, variant) of a shard, how well the simulated activations predict the
real ones (one row of the scores table), and the summaries of scores tables per layer and variant
(layer_summary, model_summary, the quality report). A variant whose simulation failed is a row
with NaN scores and its error, never a failed shard."""

import numpy as np
import polars as pl

from neuron_assets.method.controls import SUFFIX
from neuron_assets.method.revision import revision_gain
from neuron_assets.method.scoring import linear_calibration, score_neurons
from neuron_assets.stages.records import records_hash
from neuron_assets.stages.variants import CONTROL_ROWS

SCHEMA = {"layer": pl.Int32, "unit": pl.Int32, "variant": pl.String, "explanation": pl.String,
          "score_all": pl.Float64, "score_top": pl.Float64, "score_random": pl.Float64,
          "rsquared": pl.Float64, "abs_dev_explained": pl.Float64, "calibrated": pl.Boolean,
          "n_failed_tokens": pl.Int64, "cost_usd": pl.Float64, "simulator_model": pl.String, "method": pl.String,
          "explanation_id": pl.String, "records_hash": pl.String, "donor_unit": pl.Int32, "error": pl.String}
SCORES = ("score_all", "score_top", "score_random", "rsquared", "abs_dev_explained")
GOOD = 0.8  # the paper's bar for a well-explained neuron
REPORT_COLUMNS = ("layer", "variant", "method", "units", "errors", "mean_score_all", "share_at_least_0.8",
                  "control_mean_score_all", "margin_over_control", "gain_over_llm", "mean_detection_random",
                  "mean_detection_hard_negative", "mean_fuzzing_random", "mean_fuzzing_hard_negative",
                  "mean_embedding_auroc", "control_mean_embedding_auroc", "cost_usd")
BALANCED_ACCURACIES = ("detection", "detection_random", "detection_hard_negative",
                       "fuzzing", "fuzzing_random", "fuzzing_hard_negative")
EMBEDDING_AUROCS = ("auroc", "auroc_random", "auroc_hard_negative")  # columns of embedding_scores


def _padded(groups: list[list[np.ndarray]]) -> np.ndarray:
    """One row per group, its sequences concatenated, NaN after the row's end: `score_neurons`' padding."""
    lengths = [sum(len(seq) for seq in seqs) for seqs in groups]
    out = np.full((len(groups), max(lengths, default=0)), np.nan)
    for row, seqs, length in zip(out, groups, lengths):
        if seqs:
            row[:length] = np.concatenate(seqs)
    return out


# Rows of the calibration split; every other row (valid, or an error row without a sequence) is scored.
CALIBRATION_ROWS = (pl.col("split") == "calibration").fill_null(False)


def with_split(simulations: pl.DataFrame) -> pl.DataFrame:
    """The simulations with their split column: a table written before the calibration split has
    none, and all its rows are valid."""
    return simulations if "split" in simulations.columns else simulations.with_columns(split=pl.lit("valid"))


def _sequences(rows: pl.DataFrame, truth: dict) -> tuple[dict, dict]:
    """Real and simulated sequences by kind of the simulated `rows`; truth: {kind: {seq_id: activations}}."""
    real, sim = {"top": [], "random": []}, {"top": [], "random": []}
    for kind, seq_id, expected in rows.filter(pl.col("expected").is_not_null()).select(
            "kind", "seq_id", "expected").iter_rows():
        activations = truth[kind][seq_id]
        if len(activations) != len(expected):  # concatenated rows would misalign silently
            raise ValueError("real and simulated sequences differ in length")
        real[kind].append(activations)
        sim[kind].append(np.asarray(expected, dtype=np.float32))
    return real, sim


def _failures(rows: pl.DataFrame, what: str) -> str | None:
    failed = rows["expected"].null_count()
    return f"{failed} of {rows.height} {what} failed to simulate" if failed else None


def score_units(simulations: pl.DataFrame, explanations: pl.DataFrame, records: dict,
                failed_tokens: str = "zero") -> pl.DataFrame:
    """The scores table (SCHEMA): one row per (unit, variant) of `simulations`, its valid split
    scored against the units' `records` ({unit: {kind: [(seq_id, activations)]}}); `explanations`
    (explanation_variants) give the text, donor and explainer cost. Every simulated variant is
    scored in one `score_neurons` call, failed tokens by the `failed_tokens` rule. rsquared and
    abs_dev_explained are of the valid simulation calibrated by `linear_calibration` of the
    variant's calibration split (`calibrated`); without calibration rows (a table without a
    `split` column is all valid), or with a constant calibration simulation, of the 0-10 values.
    A variant without any simulated valid sequence has NaN scores and the simulation's error; one
    with some failed sequences is scored (or calibrated) on the others and says how many failed."""
    simulations = with_split(simulations)
    text = dict(zip(explanations["explanation_id"], explanations["text"]))
    explain_cost = dict(zip(explanations["explanation_id"], explanations["cost_usd"]))
    donor = dict(zip(explanations["explanation_id"], explanations["donor_unit"]))
    rows, scored = [], []  # scored: (index in rows, real and simulated sequences by kind, calibration)
    for (unit, variant), group in simulations.group_by("unit", "variant", maintain_order=True):
        first = group.row(0, named=True)
        explanation_id = first["explanation_id"]
        row = {"layer": first["layer"], "unit": unit, "variant": variant, "explanation": text.get(explanation_id),
               "donor_unit": donor.get(explanation_id), "simulator_model": first["simulator_model"],
               "method": first["method"], "explanation_id": explanation_id,
               "cost_usd": explain_cost.get(explanation_id, 0.0) + float(group["cost_usd"].sum())}
        valid, calibration = group.filter(~CALIBRATION_ROWS), group.filter(CALIBRATION_ROWS)
        if valid["expected"].null_count() == valid.height:
            rows.append({**row, **dict.fromkeys(SCORES, float("nan")), "calibrated": False, "n_failed_tokens": 0,
                         "records_hash": None, "error": valid["error"][0] if valid.height else first["error"]})
            continue
        truth = {kind: dict(pairs) for kind, pairs in records[unit].items()}
        real, sim = _sequences(valid, truth)
        calibration_real, calibration_sim = _sequences(calibration, truth)
        fit = linear_calibration([*calibration_real["top"], *calibration_real["random"]],
                                 [*calibration_sim["top"], *calibration_sim["random"]], failed_tokens)
        # the scored sequences, in the table's order (what the audit recomputes)
        used = [(seq_id, truth[kind][seq_id]) for kind, seq_id in
                valid.filter(pl.col("expected").is_not_null()).select("kind", "seq_id").iter_rows()]
        errors = [e for e in (_failures(valid, "sequences"), _failures(calibration, "calibration sequences")) if e]
        scored.append((len(rows), real, sim, fit))
        rows.append({**row, "calibrated": not np.isnan(fit[0]), "records_hash": records_hash(used),
                     "error": "; ".join(errors) or None})
    scores = score_neurons(_padded([real["top"] for _, real, _, _ in scored]),
                           _padded([sim["top"] for _, _, sim, _ in scored]),
                           _padded([real["random"] for _, real, _, _ in scored]),
                           _padded([sim["random"] for _, _, sim, _ in scored]),
                           failed_tokens, np.array([fit for _, _, _, fit in scored]).reshape(-1, 2))
    for i, (row, _, _, _) in enumerate(scored):
        rows[row].update({name: values[i].item() for name, values in scores.items()})
    return pl.DataFrame(rows, schema=SCHEMA).sort("unit", "variant")


def _finite_mean(column: str) -> pl.Expr:
    return pl.col(column).filter(pl.col(column).is_not_nan()).mean()


def _gains_over_llm(real: pl.DataFrame, keys: list[str]) -> pl.DataFrame:
    """Per `keys` of the variants other than llm: `revision_gain` over the units whose score_all is
    finite for both the variant and llm (no row where there is no such unit)."""
    llm = real.filter(pl.col("variant") == "llm").select("layer", "unit", "method", llm_score=pl.col("score_all"))
    pairs = (real.filter(pl.col("variant") != "llm").join(llm, on=["layer", "unit", "method"])
             .filter(pl.col("score_all").is_not_nan() & pl.col("llm_score").is_not_nan()))
    gains = [(*key, revision_gain(group["llm_score"].to_list(), group["score_all"].to_list()))
             for key, group in pairs.group_by(keys)]
    return pl.DataFrame(gains, schema={**{k: real.schema[k] for k in keys}, "gain_over_llm": pl.Float64},
                        orient="row")


def summarize(scores: pl.DataFrame, detection: pl.DataFrame | None = None,
              embedding: pl.DataFrame | None = None) -> pl.DataFrame:
    """One row per (layer, variant, method) of the explanation variants; controls fold into the row
    of their variant, and scores of different simulation methods are never pooled.

    - neurons, scored (finite score_all), mean / median score_all, mean score_top / score_random,
      share_at_least_0.8 (of scored neurons), errors;
    - control_mean_score_all: mean score_all of the variant's shuffled control, and
      margin_over_control = mean_score_all - control_mean_score_all;
    - gain_over_llm: `revision_gain` of the variant over llm (the revision gain for 'revised');
      null for llm and where no neuron has both scores finite;
    - with `detection`: mean balanced accuracies (detection, fuzzing; with random and with hard
      negatives) and r_detection / r_fuzzing, the Pearson r over neurons between score_all and the
      balanced accuracy over all negatives;
    - with `embedding` (embedding_scores): mean_embedding_auroc (over all negatives),
      mean_embedding_auroc_random / _hard_negative, and control_mean_embedding_auroc, the mean AUROC
      of the variant's shuffled control;
    - cost_usd: explainer + simulator for the variant, its control and its detection scores.
    """
    keys = ["layer", "variant", "method"]
    real, controls = scores.filter(~CONTROL_ROWS), scores.filter(CONTROL_ROWS)
    finite = pl.col("score_all").filter(pl.col("score_all").is_not_nan())
    out = real.group_by(keys).agg(
        pl.len().alias("units"),
        finite.len().alias("scored"),
        finite.mean().alias("mean_score_all"),
        finite.median().alias("median_score_all"),
        _finite_mean("score_top").alias("mean_score_top"),
        _finite_mean("score_random").alias("mean_score_random"),
        (finite >= GOOD).mean().alias("share_at_least_0.8"),
        pl.col("error").is_not_null().sum().alias("errors"),
        pl.col("cost_usd").sum(),
    )
    control_means = controls.with_columns(pl.col("variant").str.strip_suffix(SUFFIX)).group_by(keys).agg(
        _finite_mean("score_all").alias("control_mean_score_all"), pl.col("cost_usd").sum().alias("control_cost"))
    out = (out.join(control_means, on=keys, how="left").join(_gains_over_llm(real, keys), on=keys, how="left")
           .with_columns(margin_over_control=pl.col("mean_score_all") - pl.col("control_mean_score_all"),
                         cost_usd=pl.col("cost_usd") + pl.col("control_cost").fill_null(0.0))
           .drop("control_cost"))
    if detection is not None:
        out = out.join(_detection_summary(real, detection), on=keys, how="left").with_columns(
            cost_usd=pl.col("cost_usd") + pl.col("detection_cost").fill_null(0.0)).drop("detection_cost")
    if embedding is not None:
        out = out.join(_embedding_summary(scores, embedding), on=keys, how="left")
    return out.sort(keys)


def with_unit_activity(summary: pl.DataFrame, dead: list[int], rare: list[int]) -> pl.DataFrame:
    """The summary with its layer's dead and rare units (method/selection.py `dead_and_rare`, over every
    unit of the layer, selected or not) on each row: n_dead_units, n_rare_units, and the units
    themselves, ascending (dead_units, rare_units)."""
    lists = {name: pl.Series(name, [units] * summary.height, dtype=pl.List(pl.Int32))
             for name, units in (("dead_units", dead), ("rare_units", rare))}
    return summary.with_columns(n_dead_units=pl.lit(len(dead), pl.Int64), n_rare_units=pl.lit(len(rare), pl.Int64),
                                **lists)


def _detection_summary(real: pl.DataFrame, detection: pl.DataFrame) -> pl.DataFrame:
    """Per (layer, variant, method): mean balanced accuracies and their correlation with score_all."""
    joined = real.select("layer", "unit", "variant", "method", "score_all").join(
        detection, on=["layer", "unit", "variant"])

    def r(column: str) -> pl.Expr:
        both = pl.col("score_all").is_not_nan() & pl.col(column).is_not_nan()
        return pl.corr(pl.col("score_all").filter(both), pl.col(column).filter(both)).alias(f"r_{column}")

    # NaN, not null, where no neuron has an accuracy of that kind (e.g. no hard negatives anywhere)
    accuracies = [_finite_mean(c).fill_null(float("nan")).alias(f"mean_{c}") for c in BALANCED_ACCURACIES]
    return joined.group_by("layer", "variant", "method").agg(
        *accuracies, r("detection"), r("fuzzing"), pl.col("cost_usd").sum().alias("detection_cost"))


def _embedding_summary(scores: pl.DataFrame, embedding: pl.DataFrame) -> pl.DataFrame:
    """Per (layer, variant, method): the variant's mean embedding AUROCs and its control's mean AUROC
    (NaN, not null, where no neuron has a finite one)."""
    keys = ["layer", "variant", "method"]
    joined = scores.select("layer", "unit", "variant", "method").join(
        embedding.select("layer", "unit", "variant", *EMBEDDING_AUROCS), on=["layer", "unit", "variant"])
    means = joined.filter(~CONTROL_ROWS).group_by(keys).agg(
        _finite_mean(c).fill_null(float("nan")).alias(f"mean_embedding_{c}") for c in EMBEDDING_AUROCS)
    controls = joined.filter(CONTROL_ROWS).with_columns(pl.col("variant").str.strip_suffix(SUFFIX)).group_by(keys).agg(
        _finite_mean("auroc").fill_null(float("nan")).alias("control_mean_embedding_auroc"))
    return means.join(controls, on=keys, how="left")


def quality_report(summary: pl.DataFrame) -> pl.DataFrame:
    """The columns of a summary a person compares first: layers x variants."""
    return summary.select([c for c in REPORT_COLUMNS if c in summary.columns])
