"""revised_explanations[layer|shard]: the 'revised' variant, written after the explainer sees where
its first explanation predicts badly on held-out excerpts."""

import polars as pl
import dagster as dg

from neuron_assets.assets.common import (OWNERS, PATH, REUSED, layer_and_shard, llm_metadata, markdown_table,
                                         previous_rows, progress_log)
from neuron_assets.assets.corpus import corpus_tokens
from neuron_assets.automation import ON_CHANGE
from neuron_assets.partitions import Layout, layer_shard_partitions
from neuron_assets.resources.llm import LLM, LLM_POOL
from neuron_assets.resources.storage import TableStorage
from neuron_assets.resources.study import Study
from neuron_assets.stages.records import records_of, tokens_by_seq
from neuron_assets.stages.revise import REVISED_SCHEMA, revise_units

CODE_VERSION = "4"  # 2: inputs_version (explainer and simulator versions, seed) decides reuse. 3: cost_usd.
# 4: the column neuron is now unit (donor_neuron: donor_unit)


def build_revised_explanations(layout: Layout, explainer_version: str, simulator_version: str,
                               simulator_fewshot: list[dict]):
    @dg.asset(
        partitions_def=layer_shard_partitions(layout),
        deps=["explanations",
              dg.AssetDep("neuron_records", partition_mapping=dg.MultiToSingleDimensionPartitionMapping("layer")),
              corpus_tokens, "explainer", "simulator", "sampling"],
        code_version=f"{CODE_VERSION}-{explainer_version}-{simulator_version}",
        automation_condition=ON_CHANGE,
        kinds={"pytorch", "parquet"},
        owners=OWNERS,
        group_name="explanations",
        pool=LLM_POOL,
        description="The 'revised' variant: the llm explanation is simulated on the held-out calibration "
        "split (5 top + 5 random records); the excerpts where it misses activations or raises false "
        "alarms are shown to the explainer with its train records and first explanation, and it writes "
        "a revised one. Where nothing is mispredicted the first explanation is kept as the revision.",
    )
    def revised_explanations(
        context: dg.AssetExecutionContext, storage: TableStorage, explainer: LLM, simulator: LLM, study: Study
    ) -> dg.MaterializeResult:
        layer_key, _ = layer_and_shard(context)
        first = storage.read("explanations", context.partition_key).filter(pl.col("variant") == "llm")
        result = revise_units(
            int(layer_key), first, records_of(storage.read("neuron_records", layer_key, "records"),
                                              first["unit"].to_list()),
            tokens_by_seq(storage.read("corpus_tokens")),
            previous_rows(storage, "revised_explanations", context.partition_key), explainer, simulator,
            simulator_fewshot, explainer_version, study.seed, context.assets_def.code_versions_by_key[context.asset_key],
            report=progress_log(context), what=f"revising {context.partition_key}", log=context.log.info)
        df = pl.DataFrame(result.rows, schema=REVISED_SCHEMA).sort("unit")
        version = storage.write(df, "revised_explanations", context.partition_key)
        preview = df.join(first.select("unit", first=pl.col("text")), on="unit", how="left")
        return dg.MaterializeResult(
            data_version=dg.DataVersion(version),
            metadata={
                "dagster/row_count": df.height,
                "revised": result.revised,
                "kept (nothing mispredicted)": result.kept,
                REUSED: result.reused,
                "errors": int(df["error"].is_not_null().sum()),
                "misses shown": int(df["misses"].sum()),
                "false alarms shown": int(df["false_alarms"].sum()),
                **llm_metadata(df, result.seconds, result.model_seconds),
                "preview": markdown_table(preview.select("unit", "first", revised=pl.col("text")).head(10)),
                PATH: dg.MetadataValue.path(str(storage.path("revised_explanations", context.partition_key))),
            },
        )

    return revised_explanations
