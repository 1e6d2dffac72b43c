"""scores[layer|shard] -> layer_summary[layer] -> model_summary: how well explanations predict."""

import os

import numpy as np
import polars as pl
from dagster import (
    AssetCheckResult,
    AssetCheckSpec,
    AssetDep,
    AssetExecutionContext,
    DataVersion,
    MaterializeResult,
    MetadataValue,
    MultiToSingleDimensionPartitionMapping,
    TableColumn,
    TableColumnDep,
    TableColumnLineage,
    TableSchema,
    asset,
)

from neuron_assets.assets.common import (
    CONTROL_ROWS,
    OWNERS,
    layer_and_shard,
    markdown_table,
    percentiles,
    viewer_page,
)
from neuron_assets.assets.explanations import explanation_variants
from neuron_assets.automation import ON_CHANGE
from neuron_assets.checks import scores_in_range
from neuron_assets.method.controls import SUFFIX
from neuron_assets.method.scoring import score_neurons
from neuron_assets.partitions import Layout, layer_partitions, layer_shard_partitions
from neuron_assets.plots import png_markdown, score_by_layer, score_histogram
from neuron_assets.resources.storage import TableStorage
from neuron_assets.resources.study import Study
from neuron_assets.stages.records import records_hash, records_of

SCHEMA = {"layer": pl.Int32, "neuron": pl.Int32, "variant": pl.String, "explanation": pl.String,
          "score_all": pl.Float64, "score_top": pl.Float64, "score_random": pl.Float64,
          "rsquared": pl.Float64, "abs_dev_explained": pl.Float64, "n_failed_tokens": pl.Int64, "cost": pl.Float64,
          "simulator_model": pl.String, "method": pl.String, "explanation_id": pl.String,
          "records_hash": pl.String, "donor_neuron": pl.Int32, "error": pl.String}
SCORES_IN_RANGE = "scores_in_range"
GOOD = 0.8  # the paper's bar for a well-explained neuron
REPORT_COLUMNS = ("layer", "variant", "method", "neurons", "mean_score_all", "share_at_least_0.8",
                  "control_mean_score_all", "margin_over_control", "gain_over_llm", "mean_detection_random",
                  "mean_detection_hard", "mean_fuzzing_random", "mean_fuzzing_hard", "cost_usd")
BALANCED_ACCURACIES = ("detection", "detection_random", "detection_hard", "fuzzing", "fuzzing_random", "fuzzing_hard")


def _padded(groups: list[list[np.ndarray]]) -> np.ndarray:
    """One row per group, its sequences concatenated, NaN after the row's end: `score_neurons`' padding."""
    lengths = [sum(len(seq) for seq in seqs) for seqs in groups]
    out = np.full((len(groups), max(lengths, default=0)), np.nan)
    for row, seqs, length in zip(out, groups, lengths):
        if seqs:
            row[:length] = np.concatenate(seqs)
    return out


def _score_rows(sims: pl.DataFrame, explanations: pl.DataFrame, records: dict) -> list[dict]:
    """One row per (neuron, variant) of the partition; every simulated group is scored in one
    `score_neurons` call."""
    text = dict(zip(explanations["explanation_id"], explanations["text"]))
    explain_cost = dict(zip(explanations["explanation_id"], explanations["cost"]))
    donor = dict(zip(explanations["explanation_id"], explanations["donor_neuron"]))
    rows, scored = [], []  # scored: (index in rows, real and simulated sequences by split)
    for (neuron, variant), group in sims.group_by("neuron", "variant", maintain_order=True):
        first = group.row(0, named=True)
        base = {"layer": first["layer"], "neuron": neuron, "variant": variant,
                "explanation": text.get(first["explanation_id"]), "donor_neuron": donor.get(first["explanation_id"]),
                "simulator_model": first["simulator_model"],
                "method": first["method"], "explanation_id": first["explanation_id"],
                "cost": explain_cost.get(first["explanation_id"], 0.0) + float(group["cost"].sum())}
        nan = dict.fromkeys(("score_all", "score_top", "score_random", "rsquared", "abs_dev_explained"), float("nan"))
        simulated = group.filter(pl.col("expected").is_not_null())
        if simulated.height == 0:
            rows.append({**base, **nan, "n_failed_tokens": 0, "records_hash": None, "error": first["error"]})
            continue
        truth = {kind: dict(pairs) for kind, pairs in records[neuron].items()}
        real, sim = {"top": [], "random": []}, {"top": [], "random": []}
        for split, seq_id, expected in simulated.select("split", "seq_id", "expected").iter_rows():
            if len(truth[split][seq_id]) != len(expected):  # concatenated rows would misalign silently
                raise ValueError("real and simulated sequences differ in length")
            real[split].append(truth[split][seq_id])
            sim[split].append(np.asarray(expected, dtype=np.float32))
        failed_rows = group.height - simulated.height
        error = f"{failed_rows} of {group.height} sequences failed to simulate" if failed_rows else None
        used = [(s, truth[split][s]) for split, s in simulated.select("split", "seq_id").iter_rows()]
        scored.append((len(rows), real, sim))
        rows.append({**base, "records_hash": records_hash(used), "error": error})
    scores = score_neurons(_padded([real["top"] for _, real, _ in scored]),
                           _padded([sim["top"] for _, _, sim in scored]),
                           _padded([real["random"] for _, real, _ in scored]),
                           _padded([sim["random"] for _, _, sim in scored]))
    for i, (row, _, _) in enumerate(scored):
        rows[row].update({name: values[i].item() for name, values in scores.items()})
    return rows


def build_scores(layout: Layout, sources: list[str], control: bool):
    @asset(
        partitions_def=layer_shard_partitions(layout),
        deps=["simulations", *sources,
              AssetDep("neuron_records", partition_mapping=MultiToSingleDimensionPartitionMapping("layer")),
              "sampling", "controls"],
        # 2: scored in one vectorised call; where a group has failed tokens or sequences, sums run
        # in another order, so scores can differ from version 1's in the last bits (< 1e-14).
        # 3: controls (donor_neuron) and several explanation sources.
        code_version="3",
        automation_condition=ON_CHANGE,
        kinds={"numpy", "parquet"},
        owners=OWNERS,
        group_name="scores",
        check_specs=[AssetCheckSpec(SCORES_IN_RANGE, asset="scores",
                                    description="scores lie in [-1, 1] or are NaN, and NaNs are counted")],
        description="Correlation of simulated with real activations, pooled over all tokens: "
        "score_all (5 top + 5 random, the headline), score_top, score_random; rsquared and "
        "abs_dev_explained (meaningful only after calibration). NaN when the simulation is constant.",
    )
    def scores(context: AssetExecutionContext, storage: TableStorage, study: Study) -> MaterializeResult:
        layer_key, _ = layer_and_shard(context)
        sims = storage.read("simulations", context.partition_key)
        explanations = explanation_variants(storage, sources, context.partition_key, study.seed, control)
        records = records_of(storage.read("neuron_records", layer_key, "records"), sims["neuron"].unique().to_list())
        df = pl.DataFrame(_score_rows(sims, explanations, records), schema=SCHEMA).sort("neuron", "variant")
        version = storage.write(df, "scores", context.partition_key)
        best = df.filter(pl.col("score_all").is_not_nan()).sort("score_all", descending=True)
        return MaterializeResult(
            data_version=DataVersion(version),
            metadata={
                "dagster/row_count": df.height,
                **percentiles(df.filter(pl.col("variant") == "llm")["score_all"].to_list(), "llm score_all"),
                "best neurons": markdown_table(best.select("neuron", "variant", "score_all", "explanation").head(5)),
                "path": MetadataValue.path(str(storage.path("scores", context.partition_key))),
                "dagster/column_schema": TableSchema(columns=[TableColumn(c, str(t)) for c, t in SCHEMA.items()]),
                "dagster/column_lineage": TableColumnLineage(deps_by_column={
                    **{c: [TableColumnDep("simulations", "expected"), TableColumnDep("neuron_records", "activations")]
                       for c in ("score_all", "score_top", "score_random", "rsquared", "abs_dev_explained")},
                    "n_failed_tokens": [TableColumnDep("simulations", "expected")],
                    "explanation": [TableColumnDep("explanations", "text")],
                    "explanation_id": [TableColumnDep("simulations", "explanation_id")],
                    "records_hash": [TableColumnDep("simulations", "seq_id"),
                                     TableColumnDep("neuron_records", "activations")],
                    "simulator_model": [TableColumnDep("simulations", "simulator_model")],
                    "method": [TableColumnDep("simulations", "method")],
                    "cost": [TableColumnDep("explanations", "cost"), TableColumnDep("simulations", "cost")],
                }),
            },
            check_results=[AssetCheckResult(check_name=SCORES_IN_RANGE, **scores_in_range(df))],
        )

    return scores


def _finite_mean(column: str) -> pl.Expr:
    return pl.col(column).filter(pl.col(column).is_not_nan()).mean()


def summarize(scores: pl.DataFrame, detection: pl.DataFrame | None = None) -> pl.DataFrame:
    """One row per (layer, variant, method) of the explanation variants; controls fold into the row
    of their variant, and scores of different simulation methods are never pooled.

    - neurons, scored (finite score_all), mean / median score_all, mean score_top / score_random,
      share_at_least_0.8 (of scored neurons), errors;
    - control_mean_score_all: mean score_all of the variant's shuffled control, and
      margin_over_control = mean_score_all - control_mean_score_all;
    - gain_over_llm: mean over neurons scored by both of (score_all - the llm variant's score_all)
      (the revision gain for 'revised'); null for llm;
    - with `detection`: mean balanced accuracies (detection, fuzzing; with random and with hard
      negatives) and r_detection / r_fuzzing, the Pearson r over neurons between score_all and the
      balanced accuracy over all negatives;
    - cost_usd: explainer + simulator for the variant, its control and its detection scores.
    """
    control = CONTROL_ROWS
    keys = ["layer", "variant", "method"]
    real, controls = scores.filter(~control), scores.filter(control)
    finite = pl.col("score_all").filter(pl.col("score_all").is_not_nan())
    out = real.group_by(keys).agg(
        pl.len().alias("neurons"),
        finite.len().alias("scored"),
        finite.mean().alias("mean_score_all"),
        finite.median().alias("median_score_all"),
        _finite_mean("score_top").alias("mean_score_top"),
        _finite_mean("score_random").alias("mean_score_random"),
        (finite >= GOOD).mean().alias("share_at_least_0.8"),
        pl.col("error").is_not_null().sum().alias("errors"),
        pl.col("cost").sum().alias("cost_usd"),
    )
    control_means = controls.with_columns(pl.col("variant").str.strip_suffix(SUFFIX)).group_by(keys).agg(
        _finite_mean("score_all").alias("control_mean_score_all"), pl.col("cost").sum().alias("control_cost"))
    llm = real.filter(pl.col("variant") == "llm").select("layer", "neuron", "method", llm_score=pl.col("score_all"))
    gains = (real.filter(pl.col("variant") != "llm").join(llm, on=["layer", "neuron", "method"])
             .filter(pl.col("score_all").is_not_nan() & pl.col("llm_score").is_not_nan())
             .group_by(keys).agg((pl.col("score_all") - pl.col("llm_score")).mean().alias("gain_over_llm")))
    out = (out.join(control_means, on=keys, how="left").join(gains, on=keys, how="left")
           .with_columns(margin_over_control=pl.col("mean_score_all") - pl.col("control_mean_score_all"),
                         cost_usd=pl.col("cost_usd") + pl.col("control_cost").fill_null(0.0))
           .drop("control_cost"))
    if detection is not None:
        out = out.join(_detection_summary(real, detection), on=keys, how="left").with_columns(
            cost_usd=pl.col("cost_usd") + pl.col("detection_cost").fill_null(0.0)).drop("detection_cost")
    return out.sort(keys)


def _detection_summary(real: pl.DataFrame, detection: pl.DataFrame) -> pl.DataFrame:
    """Per (layer, variant, method): mean balanced accuracies and their correlation with score_all."""
    joined = real.select("layer", "neuron", "variant", "method", "score_all").join(
        detection, on=["layer", "neuron", "variant"])

    def r(column: str) -> pl.Expr:
        both = pl.col("score_all").is_not_nan() & pl.col(column).is_not_nan()
        return pl.corr(pl.col("score_all").filter(both), pl.col(column).filter(both)).alias(f"r_{column}")

    # NaN, not null, where no neuron has an accuracy of that kind (e.g. no hard negatives anywhere)
    accuracies = [_finite_mean(c).fill_null(float("nan")).alias(f"mean_{c}") for c in BALANCED_ACCURACIES]
    return joined.group_by("layer", "variant", "method").agg(
        *accuracies, r("detection"), r("fuzzing"), pl.col("cost").sum().alias("detection_cost"))


def quality_report(summary: pl.DataFrame) -> pl.DataFrame:
    """The columns of a summary a person compares first: layers x variants."""
    return summary.select([c for c in REPORT_COLUMNS if c in summary.columns])


RANKED = 10  # neurons in the best and the worst neurons tables


def _series(df: pl.DataFrame) -> pl.DataFrame:
    """A `series` column for plots: the variant, with the simulation method where there are several
    (scores of different methods are never pooled)."""
    if df["method"].n_unique() > 1:
        return df.with_columns(series=pl.col("variant") + " (" + pl.col("method").fill_null("?") + ")")
    return df.with_columns(series=pl.col("variant"))


def _ranked_neurons(scores: pl.DataFrame, columns: list[str]) -> dict:
    """Metadata: the best and the worst neurons by score_all among the real variants (not the
    shuffled controls), NaN scores left out; best first, then worst first."""
    finite = scores.filter(pl.col("score_all").is_not_nan() & ~CONTROL_ROWS)
    best = finite.sort(["score_all", "layer", "neuron", "variant"], descending=[True, False, False, False])
    worst = finite.sort(["score_all", "layer", "neuron", "variant"])
    return {"best neurons": markdown_table(best.select(columns).head(RANKED)),
            "worst neurons": markdown_table(worst.select(columns).head(RANKED))}


def _score_histogram(scores: pl.DataFrame) -> MetadataValue:
    """score_all of the real variants, one series per variant; NaN scores counted in the title."""
    real = _series(scores.filter(~CONTROL_ROWS))
    by_series = {name: rows["score_all"].to_list()
                 for (name,), rows in real.sort("series").group_by("series", maintain_order=True)}
    return MetadataValue.md(png_markdown(score_histogram(by_series), "score histogram"))


def viewer_link(root: str, layer: str | None = None) -> MetadataValue:
    """The neuron viewer's page of a layer (or its index): a URL under an s3:// root, else a path."""
    page = viewer_page(root, layer)
    return MetadataValue.url(page) if "://" in root else MetadataValue.path(os.path.abspath(page))


def build_layer_summary(layout: Layout, detection: bool):
    inputs = ["scores", "detection_scores"] if detection else ["scores"]

    @asset(
        partitions_def=layer_partitions(layout),
        deps=[AssetDep(name, partition_mapping=MultiToSingleDimensionPartitionMapping("layer")) for name in inputs],
        # 2: controls, gain over llm, detection and fuzzing. 3: metadata only (score histogram,
        # worst neurons, viewer link); the table is the same.
        code_version="3",
        automation_condition=ON_CHANGE,
        kinds={"polars", "parquet"},
        owners=OWNERS,
        group_name="summaries",
        description="Scores of one layer per explanation variant, over every shard materialized so far: "
        "mean score, share >= 0.8, margin over the shuffled control, gain over llm, detection and "
        "fuzzing accuracies and their correlation with the simulation score, cost.",
    )
    def layer_summary(context: AssetExecutionContext, storage: TableStorage) -> MaterializeResult:
        layer_key = context.partition_key
        shards = layout.shard_keys()
        present = [s for s in shards if storage.exists("scores", f"{layer_key}|{s}")]
        if not present:
            raise FileNotFoundError(f"layer {layer_key} has no scores yet: materialize scores for its shards first")
        scores = pl.concat([storage.read("scores", f"{layer_key}|{s}") for s in present])
        judged = [s for s in present if detection and storage.exists("detection_scores", f"{layer_key}|{s}")]
        detected = pl.concat([storage.read("detection_scores", f"{layer_key}|{s}") for s in judged]) if judged else None
        summary = summarize(scores, detected)
        version = storage.write(summary, "layer_summary", layer_key)
        return MaterializeResult(
            data_version=DataVersion(version),
            metadata={
                "dagster/row_count": summary.height,
                "shards present": f"{len(present)}/{len(shards)}",
                "shards with detection scores": f"{len(judged)}/{len(shards)}" if detection else "off",
                "neurons scored": scores["neuron"].n_unique(),
                "cost (USD)": float(summary["cost_usd"].sum()),
                "quality report": markdown_table(quality_report(summary).drop("layer")),
                "summary": markdown_table(summary.drop("layer")),
                **_ranked_neurons(scores, ["neuron", "variant", "score_all", "explanation"]),
                "score histogram": _score_histogram(scores),
                "viewer": viewer_link(storage.root, layer_key),
            },
        )

    return layer_summary


def build_model_summary(layout: Layout):
    @asset(
        # scores too: the plots and neuron tables read the scores of the layers summarized
        deps=["layer_summary", "scores"],
        code_version="3",  # 3: metadata only (plots, best and worst neurons, viewer link); the table is the same
        automation_condition=ON_CHANGE,
        kinds={"polars", "parquet"},
        owners=OWNERS,
        group_name="summaries",
        description="Every materialized layer's summary in one table: layers x explanation variants "
        "(the quality report).",
    )
    def model_summary(storage: TableStorage) -> MaterializeResult:
        keys = [layout.layer_key(i) for i in layout.layers]
        present = [k for k in keys if storage.exists("layer_summary", k)]
        if not present:
            raise FileNotFoundError("no layer_summary partition exists yet: materialize layer_summary first")
        summary = pl.concat([storage.read("layer_summary", k) for k in present],
                            how="diagonal_relaxed").sort("layer", "variant", "method")
        version = storage.write(summary, "model_summary")
        tables = [storage.read("scores", f"{k}|{s}") for k in present for s in layout.shard_keys()
                  if storage.exists("scores", f"{k}|{s}")]
        scores = pl.concat(tables, how="diagonal_relaxed") if tables else pl.DataFrame(schema=SCHEMA)
        by_layer = _series(summary)
        by_layer = by_layer.select([c for c in ("layer", "series", "mean_score_all", "control_mean_score_all")
                                    if c in by_layer.columns])
        return MaterializeResult(
            data_version=DataVersion(version),
            metadata={"dagster/row_count": summary.height, "layers present": f"{len(present)}/{len(keys)}",
                      "cost (USD)": float(summary["cost_usd"].sum()),
                      "quality report": markdown_table(quality_report(summary)), "summary": markdown_table(summary),
                      **_ranked_neurons(scores, ["layer", "neuron", "variant", "score_all", "explanation"]),
                      "score histogram": _score_histogram(scores),
                      "score by layer": MetadataValue.md(png_markdown(score_by_layer(by_layer), "score by layer")),
                      "viewer": viewer_link(storage.root)},
        )

    return model_summary
