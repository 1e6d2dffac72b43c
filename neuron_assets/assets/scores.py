"""scores[layer|shard] -> layer_summary[layer] -> model_summary: how well explanations predict."""

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

from neuron_assets.assets.common import OWNERS, layer_and_shard, markdown_table, percentiles, records_hash, records_of
from neuron_assets.automation import ON_CHANGE
from neuron_assets.checks import scores_in_range
from neuron_assets.method.scoring import score_neurons
from neuron_assets.partitions import Layout, layer_partitions, layer_shard_partitions
from neuron_assets.resources.storage import TableStorage

SCHEMA = {"layer": pl.Int32, "neuron": pl.Int32, "variant": pl.String, "explanation": pl.String,
          "score_all": pl.Float64, "score_top": pl.Float64, "score_random": pl.Float64,
          "rsquared": pl.Float64, "abs_dev_explained": pl.Float64, "n_failed_tokens": pl.Int64, "cost": pl.Float64,
          "simulator_model": pl.String, "method": pl.String, "explanation_id": pl.String,
          "records_hash": pl.String, "error": pl.String}
SCORES_IN_RANGE = "scores_in_range"
GOOD = 0.8  # the paper's bar for a well-explained neuron


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
    rows, scored = [], []  # scored: (index in rows, real and simulated sequences by split)
    for (neuron, variant), group in sims.group_by("neuron", "variant", maintain_order=True):
        first = group.row(0, named=True)
        base = {"layer": first["layer"], "neuron": neuron, "variant": variant,
                "explanation": text.get(first["explanation_id"]), "simulator_model": first["simulator_model"],
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


def build_scores(layout: Layout):
    @asset(
        partitions_def=layer_shard_partitions(layout),
        deps=["simulations", "explanations",
              AssetDep("neuron_records", partition_mapping=MultiToSingleDimensionPartitionMapping("layer"))],
        # 2: scored in one vectorised call; where a group has failed tokens or sequences, sums run
        # in another order, so scores can differ from version 1's in the last bits (< 1e-14).
        code_version="2",
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
    def scores(context: AssetExecutionContext, storage: TableStorage) -> MaterializeResult:
        layer_key, _ = layer_and_shard(context)
        sims = storage.read("simulations", context.partition_key)
        explanations = storage.read("explanations", context.partition_key)
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


def summarize(scores: pl.DataFrame) -> pl.DataFrame:
    """One row per (layer, variant, method): counts, mean/median scores, share of neurons >= 0.8,
    cost. Scores of different simulation methods are never pooled into one number."""
    finite = pl.col("score_all").filter(pl.col("score_all").is_not_nan())
    return (
        scores.group_by("layer", "variant", "method")
        .agg(
            pl.len().alias("neurons"),
            finite.len().alias("scored"),
            finite.mean().alias("mean_score_all"),
            finite.median().alias("median_score_all"),
            pl.col("score_top").filter(pl.col("score_top").is_not_nan()).mean().alias("mean_score_top"),
            pl.col("score_random").filter(pl.col("score_random").is_not_nan()).mean().alias("mean_score_random"),
            (finite >= GOOD).mean().alias("share_at_least_0.8"),
            pl.col("error").is_not_null().sum().alias("errors"),
            pl.col("cost").sum().alias("cost_usd"),
        )
        .sort("layer", "variant", "method")
    )


def build_layer_summary(layout: Layout):
    @asset(
        partitions_def=layer_partitions(layout),
        deps=[AssetDep("scores", partition_mapping=MultiToSingleDimensionPartitionMapping("layer"))],
        code_version="1",
        automation_condition=ON_CHANGE,
        kinds={"polars", "parquet"},
        owners=OWNERS,
        group_name="summaries",
        description="Scores of one layer per explanation variant, over every shard materialized so far.",
    )
    def layer_summary(context: AssetExecutionContext, storage: TableStorage) -> MaterializeResult:
        layer_key = context.partition_key
        shards = layout.shard_keys()
        present = [s for s in shards if storage.exists("scores", f"{layer_key}|{s}")]
        if not present:
            raise FileNotFoundError(f"layer {layer_key} has no scores yet: materialize scores for its shards first")
        scores = pl.concat([storage.read("scores", f"{layer_key}|{s}") for s in present])
        summary = summarize(scores)
        version = storage.write(summary, "layer_summary", layer_key)
        best = scores.filter(pl.col("score_all").is_not_nan()).sort("score_all", descending=True)
        return MaterializeResult(
            data_version=DataVersion(version),
            metadata={
                "dagster/row_count": summary.height,
                "shards present": f"{len(present)}/{len(shards)}",
                "neurons scored": scores["neuron"].n_unique(),
                "summary": markdown_table(summary.drop("layer")),
                "best neurons": markdown_table(best.select("neuron", "variant", "score_all", "explanation").head(10)),
            },
        )

    return layer_summary


def build_model_summary(layout: Layout):
    @asset(
        deps=["layer_summary"],
        code_version="1",
        automation_condition=ON_CHANGE,
        kinds={"polars", "parquet"},
        owners=OWNERS,
        group_name="summaries",
        description="Every materialized layer's summary in one table: layers x explanation variants.",
    )
    def model_summary(storage: TableStorage) -> MaterializeResult:
        keys = [layout.layer_key(i) for i in layout.layers]
        present = [k for k in keys if storage.exists("layer_summary", k)]
        if not present:
            raise FileNotFoundError("no layer_summary partition exists yet: materialize layer_summary first")
        summary = pl.concat([storage.read("layer_summary", k) for k in present]).sort("layer", "variant", "method")
        version = storage.write(summary, "model_summary")
        return MaterializeResult(
            data_version=DataVersion(version),
            metadata={"dagster/row_count": summary.height, "layers present": f"{len(present)}/{len(keys)}",
                      "cost (USD)": float(summary["cost_usd"].sum()), "summary": markdown_table(summary)},
        )

    return model_summary
