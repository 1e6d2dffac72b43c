"""detection_scores[layer|shard]: can a judge LLM tell, from the explanation alone, which whole
excerpts make the neuron fire (detection) and which highlighted tokens it fires on (fuzzing)?"""

import polars as pl
import dagster as dg

from neuron_assets.assets.common import (OWNERS, PATH, layer_and_shard, llm_metadata, markdown_table, percentiles,
                                         progress_log)
from neuron_assets.assets.corpus import corpus_tokens
from neuron_assets.automation import ON_CHANGE
from neuron_assets.partitions import Layout, layer_shard_partitions
from neuron_assets.resources.llm import LLM, LLM_POOL
from neuron_assets.resources.storage import TableStorage
from neuron_assets.resources.study import Study
from neuron_assets.stages.detect import NEGATIVES, SCHEMA, judge_units
from neuron_assets.stages.records import records_of, tokens_by_seq
from neuron_assets.stages.variants import explanation_variants

# bump when the judging logic changes; the prompt version is appended. 2: columns cost_usd and
# *_hard_negative (were cost and *_hard). 3: an answer that cannot be read is unanswered, not an error.
# 4: a local judge decides from its logits; columns detection_auroc, fuzzing_auroc, judge_method
# 6: the column neuron is now unit (donor_neuron: donor_unit)
CODE_VERSION = "6"


def build_detection_scores(layout: Layout, prompt_version: str, sources: list[str]):
    @dg.asset(
        partitions_def=layer_shard_partitions(layout),
        deps=[*sources,
              dg.AssetDep("neuron_records", partition_mapping=dg.MultiToSingleDimensionPartitionMapping("layer")),
              corpus_tokens, "simulator", "sampling"],
        code_version=f"{CODE_VERSION}-{prompt_version}",
        automation_condition=ON_CHANGE,
        kinds={"pytorch", "parquet"},
        owners=OWNERS,
        group_name="scores",
        pool=LLM_POOL,
        description="Balanced accuracy of the simulator LLM, as a judge at temperature 0, on whole "
        "excerpts: detection (does the neuron fire on this excerpt?) and fuzzing (are the highlighted "
        "tokens what the explanation describes?), deciding from its logits where it runs in this process "
        "and by the JSON list it writes where it is remote; AUROC of its p(\"1\") where known. Positives: "
        "the 10 valid + test top records; "
        f"negatives: up to {NEGATIVES} random windows that do not activate, and up to {NEGATIVES} hard "
        "negatives (windows with the neuron's top tokens that do not activate). NaN where a kind has "
        "no example; unanswered excerpts are counted, never guessed.",
    )
    def detection_scores(
        context: dg.AssetExecutionContext, storage: TableStorage, simulator: LLM, study: Study
    ) -> dg.MaterializeResult:
        layer_key, _ = layer_and_shard(context)
        explained = explanation_variants([storage.read(s, context.partition_key) for s in sources],
                                         context.partition_key, study.seed, control=False)
        records = records_of(storage.read("neuron_records", layer_key, "records"), explained["unit"].unique().to_list())
        result = judge_units(
            explained, records, tokens_by_seq(storage.read("corpus_tokens")), simulator, study.seed,
            context.assets_def.code_versions_by_key[context.asset_key], report=progress_log(context),
            what=f"judging {context.partition_key}")
        df = pl.DataFrame(result.rows, schema=SCHEMA)
        version = storage.write(df, "detection_scores", context.partition_key)
        return dg.MaterializeResult(
            data_version=dg.DataVersion(version),
            metadata={
                "dagster/row_count": df.height,
                **percentiles(df["detection_random"].to_list(), "detection (random negatives)"),
                **percentiles(df["detection_hard_negative"].to_list(), "detection (hard negatives)"),
                "units without hard negatives": int((df["n_hard_negative"] == 0).sum()),
                "unanswered excerpts": int(df["n_unanswered"].sum()),
                "unreadable answers": len(result.unreadable),
                "first unreadable answer": result.unreadable[0] if result.unreadable else "none",
                "judge": simulator.label,
                "judge method": simulator.judge_method,
                **llm_metadata(df, result.seconds, result.model_seconds),
                "preview": markdown_table(df.select("unit", "variant", "detection_random", "detection_hard_negative",
                                                    "fuzzing_random", "fuzzing_hard_negative").head(10)),
                PATH: dg.MetadataValue.path(str(storage.path("detection_scores", context.partition_key))),
            },
        )

    return detection_scores
