"""scores[layer|shard] -> layer_summary[layer] -> model_summary: how well explanations predict."""

import os

import polars as pl
import dagster as dg

from neuron_assets.assets.common import (OWNERS, layer_and_shard, markdown_table, percentiles, viewer_page)
from neuron_assets.automation import ON_CHANGE, ON_SCORES_CHANGE
from neuron_assets.checks import scores_in_range
from neuron_assets.partitions import Layout, layer_partitions, layer_shard_partitions
from neuron_assets.plots import png_markdown, score_by_layer, score_histogram
from neuron_assets.resources.storage import TableStorage
from neuron_assets.resources.study import Study
from neuron_assets.stages.records import records_of
from neuron_assets.stages.score import SCHEMA, SCORES, quality_report, score_units, summarize, with_unit_activity
from neuron_assets.stages.variants import CONTROL_ROWS, explanation_variants

SCORES_IN_RANGE = "scores_in_range"
LINEAGE = dg.TableColumnLineage(deps_by_column={
    **{c: [dg.TableColumnDep("simulations", "expected"), dg.TableColumnDep("neuron_records", "activations")] for c in SCORES},
    "calibrated": [dg.TableColumnDep("simulations", "split"), dg.TableColumnDep("simulations", "expected")],
    "n_failed_tokens": [dg.TableColumnDep("simulations", "expected")],
    "explanation": [dg.TableColumnDep("explanations", "text")],
    "explanation_id": [dg.TableColumnDep("simulations", "explanation_id")],
    "records_hash": [dg.TableColumnDep("simulations", "seq_id"), dg.TableColumnDep("neuron_records", "activations")],
    "simulator_model": [dg.TableColumnDep("simulations", "simulator_model")],
    "method": [dg.TableColumnDep("simulations", "method")],
    "cost_usd": [dg.TableColumnDep("explanations", "cost_usd"), dg.TableColumnDep("simulations", "cost_usd")],
})


def build_scores(layout: Layout, sources: list[str], control: bool, failed_tokens: str):
    @dg.asset(
        partitions_def=layer_shard_partitions(layout),
        deps=["simulations", *sources,
              dg.AssetDep("neuron_records", partition_mapping=dg.MultiToSingleDimensionPartitionMapping("layer")),
              "sampling", "controls", "scoring"],
        # 2: scored in one vectorised call; where a group has failed tokens or sequences, sums run
        # in another order, so scores can differ from version 1's in the last bits (< 1e-14).
        # 3: controls (donor_neuron) and several explanation sources. 4: column cost -> cost_usd.
        # 5: failed tokens scored as 0 (NEURON_ASSETS_FAILED_TOKENS); rsquared and abs_dev_explained
        # calibrated on the calibration split (column calibrated). 6: the column neuron is now unit (donor_neuron: donor_unit)
        code_version="6",
        automation_condition=ON_CHANGE,
        kinds={"numpy", "parquet"},
        owners=OWNERS,
        group_name="scores",
        check_specs=[dg.AssetCheckSpec(SCORES_IN_RANGE, asset="scores",
                                       description="scores lie in [-1, 1] or are NaN, and NaNs are counted")],
        description="Correlation of simulated with real activations over the valid split, pooled over all "
        "tokens: score_all (5 top + 5 random, the headline), score_top, score_random, of the simulator's 0-10 "
        "values (NaN when the simulation is constant). rsquared and abs_dev_explained are calibrated: of the "
        "simulation mapped by the least-squares line fitted on the calibration split (5 top + 5 random), where "
        "`calibrated` is true; else of the 0-10 values. Failed tokens are counted (n_failed_tokens) and "
        f"{'scored as 0' if failed_tokens == 'zero' else 'left out'} (NEURON_ASSETS_FAILED_TOKENS={failed_tokens}).",
    )
    def scores(context: dg.AssetExecutionContext, storage: TableStorage, study: Study) -> dg.MaterializeResult:
        layer_key, _ = layer_and_shard(context)
        simulations = storage.read("simulations", context.partition_key)
        explanations = explanation_variants([storage.read(s, context.partition_key) for s in sources],
                                            context.partition_key, study.seed, control)
        records = records_of(storage.read("neuron_records", layer_key, "records"),
                             simulations["unit"].unique().to_list())
        df = score_units(simulations, explanations, records, failed_tokens)
        version = storage.write(df, "scores", context.partition_key)
        best = df.filter(pl.col("score_all").is_not_nan()).sort("score_all", descending=True)
        return dg.MaterializeResult(
            data_version=dg.DataVersion(version),
            metadata={
                "dagster/row_count": df.height,
                **percentiles(df.filter(pl.col("variant") == "llm")["score_all"].to_list(), "llm score_all"),
                "best neurons": markdown_table(best.select("unit", "variant", "score_all", "explanation").head(5)),
                "path": dg.MetadataValue.path(str(storage.path("scores", context.partition_key))),
                "dagster/column_schema": dg.TableSchema(columns=[dg.TableColumn(c, str(t)) for c, t in SCHEMA.items()]),
                "dagster/column_lineage": LINEAGE,
            },
            check_results=[dg.AssetCheckResult(check_name=SCORES_IN_RANGE, **scores_in_range(df))],
        )

    return scores


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
    best = finite.sort(["score_all", "layer", "unit", "variant"], descending=[True, False, False, False])
    worst = finite.sort(["score_all", "layer", "unit", "variant"])
    return {"best neurons": markdown_table(best.select(columns).head(RANKED)),
            "worst neurons": markdown_table(worst.select(columns).head(RANKED))}


def _score_histogram(scores: pl.DataFrame) -> dg.MetadataValue:
    """score_all of the real variants, one series per variant; NaN scores counted in the title."""
    real = _series(scores.filter(~CONTROL_ROWS))
    by_series = {name: rows["score_all"].to_list()
                 for (name,), rows in real.sort("series").group_by("series", maintain_order=True)}
    return dg.MetadataValue.md(png_markdown(score_histogram(by_series), "score histogram"))


def _summary_metadata(summary: pl.DataFrame, scores: pl.DataFrame, neuron_columns: list[str],
                      viewer: dg.MetadataValue) -> dict:
    """What both summaries show: the cost, the quality report and the whole `summary`, the best and
    the worst neurons (`neuron_columns` of `scores`), the score histogram and the viewer link."""
    return {"cost_usd": float(summary["cost_usd"].sum()),
            "quality report": markdown_table(quality_report(summary)), "summary": markdown_table(summary.drop("dead_units", "rare_units", strict=False)),
            **_ranked_neurons(scores, neuron_columns), "score histogram": _score_histogram(scores), "viewer": viewer}


def viewer_link(root: str, layer: str | None = None) -> dg.MetadataValue:
    """The neuron viewer's page of a layer (or its index): a URL under an s3:// root, else a path."""
    page = viewer_page(root, layer)
    return dg.MetadataValue.url(page) if "://" in root else dg.MetadataValue.path(os.path.abspath(page))


def build_layer_summary(layout: Layout, detection: bool, embedding: bool):
    inputs = ["scores", *(["detection_scores"] if detection else []),
              *(["embedding_scores"] if embedding else [])]

    @dg.asset(
        partitions_def=layer_partitions(layout),
        deps=[*(dg.AssetDep(name, partition_mapping=dg.MultiToSingleDimensionPartitionMapping("layer"))
                for name in inputs), "neuron_records", "rare_units"],
        # 2: controls, gain over llm, detection and fuzzing. 3: metadata only (score histogram,
        # worst neurons, viewer link); the table is the same. 4: columns mean_detection_hard and
        # mean_fuzzing_hard -> mean_detection_hard_negative and mean_fuzzing_hard_negative; the
        # quality report shows errors. 5: mean embedding AUROCs and their control's. 6: dead and rare units.
        # 7: the hookpoint column; the columns neuron and neurons are now unit and units
        code_version="7",
        automation_condition=ON_SCORES_CHANGE,
        kinds={"polars", "parquet"},
        owners=OWNERS,
        group_name="summaries",
        description="Scores of one layer per explanation variant, over every shard materialized so far: "
        "mean score, share >= 0.8, margin over the shuffled control, gain over llm, detection and "
        "fuzzing accuracies and their correlation with the simulation score, mean embedding AUROC and "
        "its shuffled control's, cost; the layer's dead and rare units, and what its units read (hookpoint).",
    )
    def layer_summary(context: dg.AssetExecutionContext, storage: TableStorage, study: Study) -> dg.MaterializeResult:
        layer_key = context.partition_key
        shards = layout.shard_keys()
        present = [s for s in shards if storage.exists("scores", f"{layer_key}|{s}")]
        if not present:
            raise FileNotFoundError(f"layer {layer_key} has no scores yet: materialize scores for its shards first")
        scores = pl.concat([storage.read("scores", f"{layer_key}|{s}") for s in present])
        judged = [s for s in present if detection and storage.exists("detection_scores", f"{layer_key}|{s}")]
        detected = pl.concat([storage.read("detection_scores", f"{layer_key}|{s}") for s in judged]) if judged else None
        embedded = [s for s in present if embedding and storage.exists("embedding_scores", f"{layer_key}|{s}")]
        embedding_scores = (pl.concat([storage.read("embedding_scores", f"{layer_key}|{s}") for s in embedded])
                            if embedded else None)
        dead, rare = study.dead_and_rare(storage.read("neuron_records", layer_key, "stats"))
        summary = with_unit_activity(summarize(scores, detected, embedding_scores), dead, rare).with_columns(
            hookpoint=pl.lit(layout.hookpoint(int(layer_key))))
        version = storage.write(summary, "layer_summary", layer_key)
        return dg.MaterializeResult(
            data_version=dg.DataVersion(version),
            metadata={
                "dagster/row_count": summary.height,
                "shards present": f"{len(present)}/{len(shards)}",
                "shards with detection scores": f"{len(judged)}/{len(shards)}" if detection else "off",
                "shards with embedding scores": f"{len(embedded)}/{len(shards)}" if embedding else "off",
                "units scored": scores["unit"].n_unique(), "hookpoint": layout.hookpoint(int(layer_key)),
                **{f"{name} units (not explained)": f"{len(units)}: {_listed(units)}" if units else "0"
                   for name, units in (("dead", dead), ("rare", rare))},
                **_summary_metadata(summary.drop("layer"), scores, ["unit", "variant", "score_all", "explanation"],
                                    viewer_link(storage.root, layer_key)),
            },
        )

    return layer_summary


def _listed(units: list[int], most: int = 30) -> str:
    """'3, 17, 40' or, for more than `most`, the first ones and how many more."""
    shown = ", ".join(map(str, units[:most]))
    return shown if len(units) <= most else f"{shown}, ... ({len(units) - most} more)"


def build_model_summary(layout: Layout):
    @dg.asset(
        # scores too: the plots and neuron tables read the scores of the layers summarized
        deps=["layer_summary", "scores"],
        # 3: metadata only (plots, best and worst neurons, viewer link); the table is the same.
        # 4: the layer summaries' columns ..._hard -> ..._hard_negative; the quality report shows errors.
        # 5: the quality report shows the mean embedding AUROC and its control's. 6: columns unit, units
        code_version="6",
        automation_condition=ON_CHANGE,
        kinds={"polars", "parquet"},
        owners=OWNERS,
        group_name="summaries",
        description="Every materialized layer's summary in one table: layers x explanation variants "
        "(the quality report).",
    )
    def model_summary(storage: TableStorage) -> dg.MaterializeResult:
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
        return dg.MaterializeResult(
            data_version=dg.DataVersion(version),
            metadata={"dagster/row_count": summary.height, "layers present": f"{len(present)}/{len(keys)}",
                      "score by layer": dg.MetadataValue.md(png_markdown(score_by_layer(by_layer), "score by layer")),
                      **_summary_metadata(summary, scores, ["layer", "unit", "variant", "score_all", "explanation"],
                                          viewer_link(storage.root))},
        )

    return model_summary
