"""embedding_scores[layer|shard]: does the explanation sit closer to the excerpts that make the neuron
fire than to those that do not, in a sentence-embedding space? (delphi's embedding scorer: no LLM.)"""

import polars as pl
import dagster as dg

from neuron_assets.assets.common import (MODEL_SECONDS, OWNERS, PATH, layer_and_shard, markdown_table,
                                         progress_log)
from neuron_assets.assets.corpus import corpus_tokens
from neuron_assets.automation import ON_CHANGE
from neuron_assets.partitions import Layout, layer_shard_partitions
from neuron_assets.resources.embedder import Embedder
from neuron_assets.resources.storage import TableStorage
from neuron_assets.resources.study import Study
from neuron_assets.stages.detect import NEGATIVES
from neuron_assets.stages.embed import SCHEMA, embed_units
from neuron_assets.stages.records import records_of, tokens_by_seq
from neuron_assets.stages.variants import CONTROL_ROWS, explanation_variants

# bump when the scoring logic changes; the embedding model's version is appended
# 2: the column neuron is now unit (donor_neuron: donor_unit)
CODE_VERSION = "2"


def _mean(df: pl.DataFrame) -> float:
    """Mean of the finite AUROCs (over all negatives); NaN when there is none."""
    finite = df["auroc"].drop_nans().drop_nulls()
    return float(finite.mean()) if finite.len() else float("nan")


def build_embedding_scores(layout: Layout, embedder_version: str, sources: list[str], control: bool):
    """`embedder_version`: a hash of the embedding model's files, so a new model makes the scores stale."""

    @dg.asset(
        partitions_def=layer_shard_partitions(layout),
        deps=[*sources,
              dg.AssetDep("neuron_records", partition_mapping=dg.MultiToSingleDimensionPartitionMapping("layer")),
              corpus_tokens, "sampling", "controls"],
        code_version=f"{CODE_VERSION}-{embedder_version}",
        automation_condition=ON_CHANGE,
        kinds={"pytorch", "parquet"},
        owners=OWNERS,
        group_name="scores",
        description="AUROC of the cosine similarity between the explanation and each excerpt in the "
        "space of a sentence-embedding model (all-MiniLM-L6-v2), for telling the 10 valid + test top "
        f"records from up to {NEGATIVES} random and {NEGATIVES} hard negatives that do not activate (those "
        "detection judges): over all negatives, and per kind. For every explanation variant and its "
        "shuffled control; NaN where a kind has no example. No LLM: seconds per shard on a CPU.",
    )
    def embedding_scores(
        context: dg.AssetExecutionContext, storage: TableStorage, embedder: Embedder, study: Study
    ) -> dg.MaterializeResult:
        layer_key, _ = layer_and_shard(context)
        explained = explanation_variants([storage.read(s, context.partition_key) for s in sources],
                                         context.partition_key, study.seed, control)
        records = records_of(storage.read("neuron_records", layer_key, "records"),
                             explained["unit"].unique().to_list())
        result = embed_units(
            explained, records, tokens_by_seq(storage.read("corpus_tokens")), embedder,
            context.assets_def.code_versions_by_key[context.asset_key], report=progress_log(context),
            what=f"embedding {context.partition_key}")
        df = pl.DataFrame(result.rows, schema=SCHEMA).sort("unit", "variant")
        version = storage.write(df, "embedding_scores", context.partition_key)
        return dg.MaterializeResult(
            data_version=dg.DataVersion(version),
            metadata={
                "dagster/row_count": df.height,
                "mean AUROC": _mean(df.filter(~CONTROL_ROWS)),
                "control mean AUROC": _mean(df.filter(CONTROL_ROWS)),
                "failed rows": int(df["error"].is_not_null().sum()),
                "embedding model": embedder.label,
                "seconds": round(result.seconds, 1),
                MODEL_SECONDS: round(result.model_seconds, 1),
                "preview": markdown_table(df.select("unit", "variant", "auroc", "auroc_random",
                                                    "auroc_hard_negative").head(10)),
                PATH: dg.MetadataValue.path(str(storage.path("embedding_scores", context.partition_key))),
            },
        )

    return embedding_scores
