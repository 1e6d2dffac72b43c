"""simulations[layer|shard]: the simulator's expected activation per token, from the explanation alone."""

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
    asset,
)

from neuron_assets.assets.common import OWNERS, Progress, layer_and_shard, records_of, tokens_by_seq
from neuron_assets.assets.corpus import corpus_tokens
from neuron_assets.checks import no_silent_zero_simulations
from neuron_assets.method.prompts import simulator_prefix, simulator_segments
from neuron_assets.method.records import split_random, split_top
from neuron_assets.method.simulation import expected_values
from neuron_assets.partitions import Layout, layer_shard_partitions
from neuron_assets.resources.llm import LocalLLM
from neuron_assets.resources.storage import TableStorage

SCHEMA = {"layer": pl.Int32, "neuron": pl.Int32, "variant": pl.String, "explanation_id": pl.String,
          "seq_id": pl.Int32, "split": pl.String, "expected": pl.List(pl.Float32),
          "n_failed_tokens": pl.Int32, "simulator_model": pl.String, "method": pl.String, "error": pl.String}
METHOD = "all_at_once"
NO_SILENT_ZEROS = "no_silent_zero_simulations"


def valid_split(kinds: dict) -> list[tuple[str, int, np.ndarray]]:
    """The scored sequences: 5 valid top records, then 5 valid random records (METHOD.md)."""
    top = split_top(kinds.get("top", []))["valid"]
    random = split_random(kinds.get("random", []))["valid"]
    return [("top", s, a) for s, a in top] + [("random", s, a) for s, a in random]


def build_simulations(layout: Layout, prompt_version: str, fewshot: list[dict]):
    prefix = simulator_prefix(fewshot)

    @asset(
        partitions_def=layer_shard_partitions(layout),
        deps=["explanations",
              AssetDep("neuron_records", partition_mapping=MultiToSingleDimensionPartitionMapping("layer")),
              corpus_tokens],
        code_version=f"1-{prompt_version}",
        kinds={"pytorch", "parquet"},
        owners=OWNERS,
        group_name="simulations",
        pool="llm",
        check_specs=[AssetCheckSpec(NO_SILENT_ZEROS, asset="simulations",
                                    description="a failed simulation is an error row, never zeros")],
        description="Expected activation (0-10) of each token of the valid split (5 top + 5 random "
        "records), read all at once from the simulator's value distribution. Failed tokens are NaN "
        "and counted; failed sequences are rows with an error.",
    )
    def simulations(context: AssetExecutionContext, storage: TableStorage, simulator: LocalLLM) -> MaterializeResult:
        layer_key, _ = layer_and_shard(context)
        explained = storage.read("explanations", context.partition_key)
        records = records_of(storage.read("neuron_records", layer_key, "records"),
                             explained["neuron"].unique().to_list())
        tokens = tokens_by_seq(storage.read("corpus_tokens"))
        rows = []

        def row(e, seq_id=None, split=None, expected=None, n_failed=0, error=None):
            return {"layer": e["layer"], "neuron": e["neuron"], "variant": e["variant"],
                    "explanation_id": e["explanation_id"], "seq_id": seq_id, "split": split,
                    "expected": expected, "n_failed_tokens": n_failed, "simulator_model": simulator.label,
                    "method": METHOD, "error": error}

        try:
            engine, engine_error = simulator.simulator(prefix), None
            tokens_before = engine.tokens_processed
        except ValueError as exc:  # e.g. the prefix does not fit: every neuron gets this error row
            engine, engine_error, tokens_before = None, f"simulator unusable: {exc}", 0
        progress = Progress(context, explained.height, f"simulating {context.partition_key}, explanations")
        for e in explained.iter_rows(named=True):
            progress.advance()
            if e["error"] is not None or engine_error:
                rows.append(row(e, error=engine_error or f"no explanation: {e['error']}"))
                continue
            sequences = valid_split(records[e["neuron"]])
            segments = [simulator_segments(e["text"], tokens[seq_id]) for _, seq_id, _ in sequences]
            try:
                distributions = engine.simulate(segments)
            except Exception as exc:  # a failed neuron is a row with its error; the shard goes on
                rows += [row(e, s, split, error=f"simulator failed: {type(exc).__name__}: {exc}")
                         for split, s, _ in sequences]
                continue
            for (split, seq_id, _), probs in zip(sequences, distributions):
                ev, failed = expected_values(probs)
                error = f"no value token among the simulator's predictions at {int(failed.sum())} tokens" \
                    if failed.any() else None
                rows.append(row(e, seq_id, split, ev.tolist(), int(failed.sum()), error))

        df = pl.DataFrame(rows, schema=SCHEMA).sort("neuron", "variant", "split", "seq_id")
        version = storage.write(df, "simulations", context.partition_key)
        check = no_silent_zero_simulations(df)
        return MaterializeResult(
            data_version=DataVersion(version),
            metadata={
                "dagster/row_count": df.height,
                "sequences simulated": int(df["expected"].is_not_null().sum()),
                "failed rows": int(df["error"].is_not_null().sum()),
                "failed tokens": int(df["n_failed_tokens"].sum()),
                "simulator": simulator.label,
                "method": METHOD,
                "prefix tokens (cached once)": engine.prefix_tokens if engine else 0,
                "tokens processed": engine.tokens_processed - tokens_before if engine else 0,
                "seconds": round(progress.seconds, 1),
                "path": MetadataValue.path(str(storage.path("simulations", context.partition_key))),
            },
            check_results=[AssetCheckResult(check_name=NO_SILENT_ZEROS, **check)],
        )

    return simulations
