"""explanations[layer|shard]: one sentence per neuron and variant (llm, token_baseline; with the output
variants on, also output_tokens and llm_output, and the table of the tokens each unit's output promotes)."""

import polars as pl
import dagster as dg

from neuron_assets.assets.common import (CACHE_HITS, CACHE_MISSES, OWNERS, PATH, REUSED, layer_and_shard,
                                         llm_metadata, markdown_table, previous_rows, progress_log)
from neuron_assets.assets.corpus import corpus_tokens
from neuron_assets.automation import ON_CHANGE
from neuron_assets.partitions import Layout, layer_shard_partitions
from neuron_assets.resources.llm import LLM, LLM_POOL
from neuron_assets.resources.storage import TableStorage
from neuron_assets.resources.study import Study
from neuron_assets.resources.subject_model import SubjectModel
from neuron_assets.stages.explain import (SCHEMA, explain_units, output_tokens, previous_units, promoted_by_unit,
                                          rare_reasons)
from neuron_assets.stages.records import records_of, tokens_by_seq

# bump when the explanation logic changes; the prompt version is appended. 3: inputs_version. 4: cost_usd.
# 5: rare units get a reason row; the output variants. 6: the column neuron is now unit (donor_neuron: donor_unit)
CODE_VERSION = "6"


def build_explanations(layout: Layout, prompt_version: str, fewshot: list[dict]):
    @dg.asset(
        partitions_def=layer_shard_partitions(layout),
        deps=[dg.AssetDep("neuron_records", partition_mapping=dg.MultiToSingleDimensionPartitionMapping("layer")),
              corpus_tokens, "explainer", "sampling", "neuron_selection", "rare_units",
              "output_variants"],
        code_version=f"{CODE_VERSION}-{prompt_version}",
        automation_condition=ON_CHANGE,
        kinds={"pytorch", "parquet"},
        owners=OWNERS,
        group_name="explanations",
        pool=LLM_POOL,
        description="Explanations per neuron: 'llm' (the explainer sees the 5 train top records) and "
        "'token_baseline' (no LLM: the tokens with the highest mean activation), and with "
        "NEURON_ASSETS_OUTPUT_VARIANTS=on 'output_tokens' (no LLM: the tokens its output promotes) and "
        "'llm_output' (the explainer also reads them), those tokens kept in the table output_tokens. A neuron that "
        "cannot be explained (dead, rare, short of records) is a row with an error saying why.",
    )
    def explanations(
        context: dg.AssetExecutionContext, storage: TableStorage, explainer: LLM, study: Study,
        subject_model: SubjectModel,
    ) -> dg.MaterializeResult:
        layer_key, shard_key = layer_and_shard(context)
        stats = storage.read("neuron_records", layer_key, "stats")
        neurons = study.selected(layout.shard_neurons(shard_key), stats)
        rare = rare_reasons(stats, sorted(set(study.dead_and_rare(stats)[1]) & set(neurons)),
                            study.min_activation_frequency)
        previous = previous_rows(storage, "explanations", context.partition_key)
        records = records_of(storage.read("neuron_records", layer_key, "records"),
                             sorted({*neurons, *previous_units(previous)}))
        promoted = None
        if study.output_variants:  # from the weights, for the units explained here: the capture never pays for it
            table = output_tokens(subject_model, int(layer_key), neurons)
            storage.write(table, "explanations", context.partition_key, "output_tokens")
            promoted = promoted_by_unit(table)
        result = explain_units(
            int(layer_key), neurons, records, tokens_by_seq(storage.read("corpus_tokens")), previous, explainer,
            fewshot, prompt_version, study.seed, context.assets_def.code_versions_by_key[context.asset_key],
            report=progress_log(context), what=f"explaining layer {layer_key} shard {shard_key}", rare=rare,
            promoted=promoted)
        df = pl.DataFrame(result.rows, schema=SCHEMA).sort("unit", "variant")
        version = storage.write(df, "explanations", context.partition_key)
        ok = df.filter(pl.col("error").is_null())
        return dg.MaterializeResult(
            data_version=dg.DataVersion(version),
            metadata={
                "dagster/row_count": df.height,
                "units": len(neurons),
                "kept (valid, outside the selection)": result.kept,
                "rare (not explained)": len(rare),
                "errors": df.height - ok.height,
                REUSED: result.reused,
                CACHE_HITS: result.cache_hits,
                CACHE_MISSES: result.asked - result.cache_hits,
                "explainer": explainer.label,
                "prompt version": prompt_version,
                **llm_metadata(df, result.seconds, result.model_seconds),
                "preview": markdown_table(df.select("unit", "variant", "text", "error").head(10)),
                PATH: dg.MetadataValue.path(str(storage.path("explanations", context.partition_key))),
                "dagster/column_schema": dg.TableSchema(columns=[dg.TableColumn(c, str(t)) for c, t in SCHEMA.items()]),
            },
        )

    return explanations
