"""explanations[layer|shard]: one sentence per neuron and variant (llm, token_baseline)."""

import hashlib
import zlib

import polars as pl
from dagster import (
    AssetDep,
    AssetExecutionContext,
    DataVersion,
    MaterializeResult,
    MetadataValue,
    MultiToSingleDimensionPartitionMapping,
    TableColumn,
    TableSchema,
    asset,
)

from neuron_assets.assets.common import (
    OWNERS,
    layer_and_shard,
    markdown_table,
    previous_rows,
)
from neuron_assets.assets.corpus import corpus_tokens
from neuron_assets.automation import ON_CHANGE
from neuron_assets.method.controls import control_of, donors
from neuron_assets.partitions import Layout, layer_shard_partitions
from neuron_assets.resources.llm import LLM
from neuron_assets.resources.storage import TableStorage
from neuron_assets.resources.study import Study
from neuron_assets.stages.explain import SCHEMA, explain_units
from neuron_assets.stages.records import records_of, tokens_by_seq

# bump when the explanation logic changes; the prompt version is appended. 3: inputs_version
CODE_VERSION = "3"


def explanation_variants(storage: TableStorage, sources: list[str], partition_key: str, seed: int,
                         control: bool) -> pl.DataFrame:
    """Every explanation of a layer x shard partition that is simulated and scored: the rows of the
    `sources` tables (explanations, revised_explanations, imported_explanations), and with `control`
    each variant's shuffled control: every neuron explained by that variant gets the explanation of
    another such neuron of the shard (`donor_neuron`), at no explainer cost."""
    own = pl.concat([storage.read(source, partition_key) for source in sources], how="diagonal_relaxed")
    own = own.select(*SCHEMA).with_columns(donor_neuron=pl.lit(None, pl.Int32))
    if not control:
        return own
    controls = []
    for (variant,), rows in own.filter(pl.col("error").is_null()).group_by("variant", maintain_order=True):
        rows = rows.sort("neuron")
        if rows.height < 2:
            why = "a shuffled control needs at least 2 neurons of the shard explained by this variant"
            controls.append(rows.with_columns(variant=pl.lit(control_of(variant)), text=pl.lit(None, pl.String), error=pl.lit(why),
                                              cost=0.0, tokens_in=0, tokens_out=0))
            continue
        seed_v = zlib.crc32(f"{seed}|{partition_key}|{variant}".encode())
        donor = rows[donors(rows.height, seed_v)]
        ids = [hashlib.sha256(f"{control_of(variant)}|{n}|{d}".encode()).hexdigest()[:16]
               for n, d in zip(rows["neuron"], donor["explanation_id"])]
        controls.append(donor.with_columns(
            neuron=rows["neuron"], variant=pl.lit(control_of(variant)), explanation_id=pl.Series(ids),
            donor_neuron=donor["neuron"], tokens_in=0, tokens_out=0, cost=0.0, cache_hit=False))
    return pl.concat([own, *controls], how="diagonal_relaxed").sort("neuron", "variant")


def build_explanations(layout: Layout, prompt_version: str, fewshot: list[dict]):
    @asset(
        partitions_def=layer_shard_partitions(layout),
        deps=[AssetDep("neuron_records", partition_mapping=MultiToSingleDimensionPartitionMapping("layer")),
              corpus_tokens, "explainer", "sampling", "neuron_selection"],
        code_version=f"{CODE_VERSION}-{prompt_version}",
        automation_condition=ON_CHANGE,
        kinds={"pytorch", "parquet"},
        owners=OWNERS,
        group_name="explanations",
        pool="llm",
        description="Explanations per neuron: 'llm' (the explainer sees the 5 train top records) and "
        "'token_baseline' (no LLM: the tokens with the highest mean activation). A neuron that "
        "cannot be explained is a row with an error.",
    )
    def explanations(
        context: AssetExecutionContext, storage: TableStorage, explainer: LLM, study: Study
    ) -> MaterializeResult:
        layer_key, shard_key = layer_and_shard(context)
        neurons = study.selected(layout.shard_neurons(shard_key))
        result = explain_units(
            int(layer_key), neurons, records_of(storage.read("neuron_records", layer_key, "records"), neurons),
            tokens_by_seq(storage.read("corpus_tokens")), previous_rows(storage, "explanations", context.partition_key),
            explainer, fewshot, prompt_version, study.seed, context.assets_def.code_versions_by_key[context.asset_key],
            log=context.log.info, what=f"explaining layer {layer_key} shard {shard_key}, neurons")
        df = pl.DataFrame(result.rows, schema=SCHEMA).sort("neuron", "variant")
        version = storage.write(df, "explanations", context.partition_key)
        ok = df.filter(pl.col("error").is_null())
        return MaterializeResult(
            data_version=DataVersion(version),
            metadata={
                "dagster/row_count": df.height,
                "neurons": len(neurons),
                "errors": df.height - ok.height,
                "tokens in": int(df["tokens_in"].sum()),
                "tokens out": int(df["tokens_out"].sum()),
                "cost (USD)": float(df["cost"].sum()),
                "reused (unchanged inputs)": result.reused,
                "LLM cache hits": result.cache_hits,
                "LLM cache misses": result.asked - result.cache_hits,
                "explainer": explainer.label,
                "prompt version": prompt_version,
                "seconds": round(result.seconds, 1),
                "model seconds": round(result.model_seconds, 1),
                "preview": markdown_table(df.select("neuron", "variant", "text", "error").head(10)),
                "path": MetadataValue.path(str(storage.path("explanations", context.partition_key))),
                "dagster/column_schema": TableSchema(columns=[TableColumn(c, str(t)) for c, t in SCHEMA.items()]),
            },
        )

    return explanations
