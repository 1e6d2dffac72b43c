"""revised_explanations[layer|shard]: the 'revised' variant, written after the explainer sees where
its first explanation predicts badly on held-out excerpts."""

import numpy as np
import polars as pl
from dagster import (
    AssetDep,
    AssetExecutionContext,
    DataVersion,
    MaterializeResult,
    MetadataValue,
    MultiToSingleDimensionPartitionMapping,
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
from neuron_assets.method.prompts import clean_explanation
from neuron_assets.method.records import split_random, split_top
from neuron_assets.method.revision import counterexamples, revision_messages
from neuron_assets.partitions import Layout, layer_shard_partitions
from neuron_assets.resources.llm import LLM
from neuron_assets.resources.storage import TableStorage
from neuron_assets.resources.study import Study
from neuron_assets.stages.explain import SCHEMA, explanation_row
from neuron_assets.stages.records import records_hash, records_of, tokens_by_seq
from neuron_assets.stages.seeds import REVISE, unit_seed
from neuron_assets.stages.timing import ModelClock, Progress
from neuron_assets.versions import digest

REVISED_SCHEMA = {**SCHEMA, "revised_from": pl.String, "misses": pl.Int32, "false_alarms": pl.Int32}
CODE_VERSION = "2"  # 2: inputs_version (explainer and simulator versions, seed) decides reuse


def held_out(kinds: dict) -> list[tuple[int, np.ndarray]]:
    """The calibration split (5 top + 5 random records): never shown to the explainer, never scored."""
    return split_top(kinds.get("top", []))["calibration"] + split_random(kinds.get("random", []))["calibration"]


def build_revised_explanations(layout: Layout, explainer_version: str, simulator_version: str,
                               simulator_fewshot: list[dict]):
    @asset(
        partitions_def=layer_shard_partitions(layout),
        deps=["explanations",
              AssetDep("neuron_records", partition_mapping=MultiToSingleDimensionPartitionMapping("layer")),
              corpus_tokens, "explainer", "simulator", "sampling"],
        code_version=f"{CODE_VERSION}-{explainer_version}-{simulator_version}",
        automation_condition=ON_CHANGE,
        kinds={"pytorch", "parquet"},
        owners=OWNERS,
        group_name="explanations",
        pool="llm",
        description="The 'revised' variant: the llm explanation is simulated on the held-out calibration "
        "split (5 top + 5 random records); the excerpts where it misses activations or raises false "
        "alarms are shown to the explainer with its train records and first explanation, and it writes "
        "a revised one. Where nothing is mispredicted the first explanation is kept as the revision.",
    )
    def revised_explanations(
        context: AssetExecutionContext, storage: TableStorage, explainer: LLM, simulator: LLM, study: Study
    ) -> MaterializeResult:
        layer_key, _ = layer_and_shard(context)
        layer = int(layer_key)
        first = storage.read("explanations", context.partition_key).filter(pl.col("variant") == "llm")
        records = records_of(storage.read("neuron_records", layer_key, "records"), first["neuron"].to_list())
        tokens = tokens_by_seq(storage.read("corpus_tokens"))
        code_version = context.assets_def.code_versions_by_key[context.asset_key]
        previous = previous_rows(storage, "revised_explanations", context.partition_key)
        label = f"{explainer.label} (revision; simulator {simulator.label})"
        inputs = digest([explainer.version("explainer"), simulator.version("simulator"), study.seed])
        rows, pending, reused, kept, engine = [], [], 0, 0, None
        progress = Progress(context.log.info, first.height, f"revising {context.partition_key}, explanations")
        clock = ModelClock()

        def row(e, text, rhash, error=None, misses=0, false_alarms=0, **usage):
            out = explanation_row(layer, e["neuron"], "revised", text, label, explainer_version, rhash,
                                  error=error, inputs_version=inputs, **usage)
            return {**out, "revised_from": e["explanation_id"], "misses": misses, "false_alarms": false_alarms,
                    "code_version": code_version}

        for e in first.iter_rows(named=True):
            progress.advance()
            if e["error"] is not None:
                rows.append(row(e, None, None, error=f"no llm explanation to revise: {e['error']}"))
                continue
            kinds = records[e["neuron"]]
            calibration = held_out(kinds)
            rhash = records_hash(calibration)
            earlier = _reusable(previous, e, rhash, inputs, code_version)
            if earlier:  # same first explanation, excerpts, models and code: no LLM call
                rows.append(earlier)
                reused += 1
                continue
            try:
                engine = engine or simulator.simulation(simulator_fewshot, log=context.log.info)
                with clock.running():
                    results = engine.simulate(e["text"], [tokens[s] for s, _ in calibration])
            except Exception as exc:  # endpoint down, prefix too long: this neuron's row says so
                rows.append(row(e, None, rhash, error=f"simulator failed: {type(exc).__name__}: {exc}"))
                continue
            usage = {k: sum(r[k] for r in results) for k in ("tokens_in", "tokens_out", "cost")}
            simulated = [r["expected"] for r in results]
            if all(s is None for s in simulated):
                rows.append(row(e, None, rhash, error=f"first explanation could not be simulated: {results[0]['error']}",
                                **usage))
                continue
            real = [a for _, a in calibration]
            simulated = [np.full(len(a), np.nan) if s is None else s for s, a in zip(simulated, real)]
            peak = max(float(a.max()) for _, a in kinds["top"])
            misses, false_alarms = counterexamples(real, simulated, peak)
            if not misses and not false_alarms:
                rows.append(row(e, e["text"], rhash, **usage))  # nothing mispredicted: the first stands
                kept += 1
                continue
            shown = [(tokens[s], a) for s, a in split_top(kinds["top"])["train"]]
            messages = revision_messages(
                e["text"], shown, [(tokens[calibration[i][0]], real[i]) for i in misses],
                [(tokens[calibration[i][0]], real[i], simulated[i]) for i in false_alarms],
                prefill=explainer.continues_assistant_turn)
            pending.append((e, rhash, messages, usage, len(misses), len(false_alarms)))

        for start in range(0, len(pending), explainer.batch_size):
            batch = pending[start : start + explainer.batch_size]
            seeds = [unit_seed(study.seed, layer, e["neuron"], REVISE) for e, *_ in batch]
            try:
                with clock.running():
                    answers = explainer.complete([messages for _, _, messages, *_ in batch], seeds)
            except Exception as exc:  # one failed batch becomes error rows, never a failed shard
                answers = [{"text": "", "tokens_in": 0, "tokens_out": 0, "cost": 0.0, "cache_hit": False,
                            "error": f"explainer failed: {type(exc).__name__}: {exc}"}] * len(batch)
            for (e, rhash, _, usage, n_miss, n_false), answer in zip(batch, answers):
                text = clean_explanation(answer["text"]) if answer["error"] is None else None
                error = answer["error"] or (None if text else "explainer returned an empty revision")
                rows.append(row(e, text or None, rhash, error=error, misses=n_miss, false_alarms=n_false,
                                tokens_in=usage["tokens_in"] + answer["tokens_in"],
                                tokens_out=usage["tokens_out"] + answer["tokens_out"],
                                cost=usage["cost"] + answer["cost"], cache_hit=answer["cache_hit"]))

        df = pl.DataFrame(rows, schema=REVISED_SCHEMA).sort("neuron")
        version = storage.write(df, "revised_explanations", context.partition_key)
        preview = df.join(first.select("neuron", first=pl.col("text")), on="neuron", how="left")
        return MaterializeResult(
            data_version=DataVersion(version),
            metadata={
                "dagster/row_count": df.height,
                "revised": len(pending),
                "kept (nothing mispredicted)": kept,
                "reused (unchanged inputs)": reused,
                "errors": int(df["error"].is_not_null().sum()),
                "misses shown": int(df["misses"].sum()),
                "false alarms shown": int(df["false_alarms"].sum()),
                "tokens in": int(df["tokens_in"].sum()),
                "tokens out": int(df["tokens_out"].sum()),
                "cost (USD)": float(df["cost"].sum()),
                "seconds": round(progress.seconds, 1),
                "model seconds": round(clock.seconds, 1),
                "preview": markdown_table(preview.select("neuron", "first", revised=pl.col("text")).head(10)),
                "path": MetadataValue.path(str(storage.path("revised_explanations", context.partition_key))),
            },
        )

    return revised_explanations


def _reusable(previous: pl.DataFrame | None, first: dict, rhash: str, inputs: str, code_version: str) -> dict | None:
    """The neuron's earlier revision, if it came from the same first explanation, excerpts, LLM
    versions, seed and code."""
    if previous is None or "inputs_version" not in previous.columns:
        return None
    match = previous.filter((pl.col("neuron") == first["neuron"]) & pl.col("error").is_null()
                            & (pl.col("revised_from") == first["explanation_id"]) & (pl.col("records_hash") == rhash)
                            & (pl.col("inputs_version") == inputs) & (pl.col("code_version") == code_version))
    return match.row(0, named=True) if match.height else None
