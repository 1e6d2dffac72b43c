"""simulations[layer|shard]: the simulator's expected activation per token, from the explanation alone."""

import polars as pl
import dagster as dg

from neuron_assets.assets.common import (CACHE_HITS, CACHE_MISSES, OWNERS, PATH, REUSED, layer_and_shard,
                                         llm_metadata, previous_rows, progress_log)
from neuron_assets.assets.corpus import corpus_tokens
from neuron_assets.stages.variants import explanation_variants
from neuron_assets.automation import ON_CHANGE
from neuron_assets.checks import no_silent_zero_simulations
from neuron_assets.partitions import Layout, layer_shard_partitions
from neuron_assets.resources.llm import LLM, LLM_POOL
from neuron_assets.resources.storage import TableStorage
from neuron_assets.resources.study import Study
from neuron_assets.stages.records import records_of, tokens_by_seq
from neuron_assets.stages.simulate import SCHEMA, simulate_units

NO_SILENT_ZEROS = "no_silent_zero_simulations"


def build_simulations(layout: Layout, prompt_version: str, fewshot: list[dict], sources: list[str], control: bool):
    """`sources`: the explanation assets whose variants are simulated; `control`: also their
    shuffled controls."""

    @dg.asset(
        partitions_def=layer_shard_partitions(layout),
        deps=[*sources,
              dg.AssetDep("neuron_records", partition_mapping=dg.MultiToSingleDimensionPartitionMapping("layer")),
              corpus_tokens, "simulator", "sampling", "controls"],
        # 2: shuffled controls and several explanation sources. 3: simulator_version decides reuse.
        # 4: columns split -> kind, cost -> cost_usd. 5: the calibration split (column split).
        # 6: the column neuron is now unit (donor_neuron: donor_unit)
        code_version=f"6-{prompt_version}",
        automation_condition=ON_CHANGE,
        kinds={"pytorch", "parquet"},
        owners=OWNERS,
        group_name="simulations",
        pool=LLM_POOL,
        check_specs=[dg.AssetCheckSpec(NO_SILENT_ZEROS, asset="simulations",
                                       description="a failed simulation is an error row, never zeros")],
        description="Expected activation (0-10) of each token of the valid split (5 top + 5 random "
        "records, scored) and the calibration split (5 + 5, which calibrates rsquared and "
        "abs_dev_explained), read all at once from the simulator's value distribution, for every "
        "explanation variant and its shuffled control (`<variant>_shuffled`: another neuron's "
        "explanation; valid split only). Failed tokens are NaN and counted; failed sequences are "
        "rows with an error.",
    )
    def simulations(
        context: dg.AssetExecutionContext, storage: TableStorage, simulator: LLM, study: Study
    ) -> dg.MaterializeResult:
        layer_key, _ = layer_and_shard(context)
        explained = explanation_variants([storage.read(s, context.partition_key) for s in sources],
                                         context.partition_key, study.seed, control)
        result = simulate_units(
            explained, records_of(storage.read("neuron_records", layer_key, "records"),
                                  explained["unit"].unique().to_list()),
            tokens_by_seq(storage.read("corpus_tokens")), previous_rows(storage, "simulations", context.partition_key),
            simulator, fewshot, context.assets_def.code_versions_by_key[context.asset_key],
            report=progress_log(context), what=f"simulating {context.partition_key}", log=context.log.info)
        # per explanation, the stage's order: valid then calibration split, top then random records
        df = pl.DataFrame(result.rows, schema=SCHEMA).sort("unit", "variant", maintain_order=True)
        version = storage.write(df, "simulations", context.partition_key)
        return dg.MaterializeResult(
            data_version=dg.DataVersion(version),
            metadata={
                "dagster/row_count": df.height,
                "sequences simulated": int(df["expected"].is_not_null().sum()),
                "failed rows": int(df["error"].is_not_null().sum()),
                "failed tokens": int(df["n_failed_tokens"].sum()),
                "simulator": simulator.label,
                "method": ", ".join(sorted(set(df["method"]))),
                REUSED: result.reused,
                "sequences simulated now": result.sequences,
                CACHE_HITS: result.cache_hits,
                CACHE_MISSES: result.sequences - result.cache_hits,
                **llm_metadata(df, result.seconds, result.model_seconds),
                PATH: dg.MetadataValue.path(str(storage.path("simulations", context.partition_key))),
                "dagster/column_schema": dg.TableSchema(columns=[dg.TableColumn(c, str(t)) for c, t in SCHEMA.items()]),
            },
            check_results=[dg.AssetCheckResult(check_name=NO_SILENT_ZEROS, **no_silent_zero_simulations(df))],
        )

    return simulations
