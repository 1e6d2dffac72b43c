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
    records_hash,
    records_of,
    tokens_by_seq,
)
from neuron_assets.assets.corpus import corpus_tokens
from neuron_assets.automation import ON_CHANGE
from neuron_assets.method.baseline import token_baseline
from neuron_assets.method.controls import control_of, donors
from neuron_assets.method.prompts import clean_explanation, explainer_messages
from neuron_assets.method.records import split_random, split_top
from neuron_assets.partitions import Layout, layer_shard_partitions
from neuron_assets.resources.llm import LLM
from neuron_assets.resources.storage import TableStorage
from neuron_assets.resources.study import Study
from neuron_assets.stages.seeds import unit_seed
from neuron_assets.stages.timing import ModelClock, Progress
from neuron_assets.versions import digest

SCHEMA = {"layer": pl.Int32, "neuron": pl.Int32, "variant": pl.String, "explanation_id": pl.String,
          "text": pl.String, "explainer_model": pl.String, "prompt_version": pl.String,
          "records_hash": pl.String, "tokens_in": pl.Int64, "tokens_out": pl.Int64, "cost": pl.Float64,
          "cache_hit": pl.Boolean, "code_version": pl.String, "inputs_version": pl.String, "error": pl.String}
VARIANTS = ("llm", "token_baseline")
# bump when the explanation logic changes; the prompt version is appended. 3: inputs_version
CODE_VERSION = "3"


def explanation_row(layer, neuron, variant, text, model, prompt_version, rhash, tokens_in=0, tokens_out=0, cost=0.0,
         cache_hit=False, error=None, inputs_version=None):
    explanation_id = hashlib.sha256(f"{layer}|{neuron}|{variant}|{text}|{model}|{prompt_version}|{rhash}".encode())
    return {"layer": layer, "neuron": neuron, "variant": variant, "explanation_id": explanation_id.hexdigest()[:16],
            "text": text, "explainer_model": model, "prompt_version": prompt_version, "records_hash": rhash,
            "tokens_in": tokens_in, "tokens_out": tokens_out, "cost": cost, "cache_hit": cache_hit,
            "inputs_version": inputs_version, "error": error}


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


def _reusable(previous: pl.DataFrame | None, neuron: int, rhash: str, inputs: str, code_version: str) -> dict | None:
    """The neuron's earlier llm explanation, if it came from the same records, explainer version,
    seed, prompt and code."""
    if previous is None or "inputs_version" not in previous.columns:
        return None
    match = previous.filter(
        (pl.col("neuron") == neuron) & (pl.col("variant") == "llm") & pl.col("error").is_null()
        & (pl.col("records_hash") == rhash) & (pl.col("inputs_version") == inputs)
        & (pl.col("code_version") == code_version)
    )
    return match.row(0, named=True) if match.height else None


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
        layer = int(layer_key)
        neurons = study.selected(layout.shard_neurons(shard_key))
        records = records_of(storage.read("neuron_records", layer_key, "records"), neurons)
        tokens = tokens_by_seq(storage.read("corpus_tokens"))
        previous = previous_rows(storage, "explanations", context.partition_key)
        code_version = context.assets_def.code_versions_by_key[context.asset_key]
        inputs = digest([explainer.version("explainer"), study.seed])
        rows, pending, reused, hits = [], [], 0, 0
        for neuron in neurons:
            kinds = records[neuron]
            try:
                train = split_top(kinds.get("top", []))["train"]
                negatives = split_random(kinds.get("random", []))["calibration"]
            except ValueError as e:
                rows += [explanation_row(layer, neuron, v, None, explainer.label, prompt_version, None,
                              error=f"not enough records: {e}") for v in VARIANTS]
                continue
            rhash = records_hash(train)
            peak = max(float(acts.max()) for _, acts in kinds["top"])
            if peak <= 0:
                reason = f"neuron never activates: max activation {peak:.4g} <= 0 over the corpus"
                rows += [explanation_row(layer, neuron, v, None, explainer.label, prompt_version, rhash, error=reason)
                         for v in VARIANTS]
                continue
            shown = [(tokens[s], acts) for s, acts in train]
            baseline = token_baseline(shown + [(tokens[s], acts) for s, acts in negatives])
            rows.append(explanation_row(layer, neuron, "token_baseline", baseline, "none", prompt_version, rhash,
                             error=None if baseline else "no token has a positive mean activation"))
            earlier = _reusable(previous, neuron, rhash, inputs, code_version)
            if earlier:  # same records, model and prompt: no LLM call, and an identical row
                rows.append(earlier)
                reused += 1
            else:
                pending.append((neuron, rhash, explainer_messages(shown, fewshot,
                                                                  prefill=explainer.continues_assistant_turn)))

        progress = Progress(context.log.info, len(pending), f"explaining layer {layer_key} shard {shard_key}, neurons")
        clock = ModelClock()
        for start in range(0, len(pending), explainer.batch_size):
            batch = pending[start : start + explainer.batch_size]
            seeds = [unit_seed(study.seed, layer, neuron) for neuron, _, _ in batch]
            try:
                with clock.running():
                    answers = explainer.complete([messages for _, _, messages in batch], seeds)
            except Exception as e:  # one failed batch becomes error rows, never a failed shard
                failed = {"text": "", "tokens_in": 0, "tokens_out": 0, "cost": 0.0, "cache_hit": False,
                          "error": f"explainer failed: {type(e).__name__}: {e}"}
                answers = [failed] * len(batch)
            hits += sum(answer["cache_hit"] for answer in answers)
            for (neuron, rhash, _), answer in zip(batch, answers):
                error = answer["error"]
                text = clean_explanation(answer["text"]) if error is None else None
                if error is None and not text:
                    error = "explainer returned an empty explanation"
                rows.append(explanation_row(layer, neuron, "llm", text or None, explainer.label, prompt_version, rhash,
                                 answer["tokens_in"], answer["tokens_out"], answer["cost"], answer["cache_hit"], error))
            progress.advance(len(batch))

        rows = [{**row, "code_version": code_version, "inputs_version": inputs} for row in rows]
        df = pl.DataFrame(rows, schema=SCHEMA).sort("neuron", "variant")
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
                "reused (unchanged inputs)": reused,
                "LLM cache hits": hits,
                "LLM cache misses": len(pending) - hits,
                "explainer": explainer.label,
                "prompt version": prompt_version,
                "seconds": round(progress.seconds, 1),
                "model seconds": round(clock.seconds, 1),
                "preview": markdown_table(df.select("neuron", "variant", "text", "error").head(10)),
                "path": MetadataValue.path(str(storage.path("explanations", context.partition_key))),
                "dagster/column_schema": TableSchema(columns=[TableColumn(c, str(t)) for c, t in SCHEMA.items()]),
            },
        )

    return explanations
