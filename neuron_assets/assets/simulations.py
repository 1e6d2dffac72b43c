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
from neuron_assets.method.records import split_random, split_top
from neuron_assets.partitions import Layout, layer_shard_partitions
from neuron_assets.resources.llm import LLM, failed_simulation
from neuron_assets.resources.storage import TableStorage

SCHEMA = {"layer": pl.Int32, "neuron": pl.Int32, "variant": pl.String, "explanation_id": pl.String,
          "seq_id": pl.Int32, "split": pl.String, "expected": pl.List(pl.Float32),
          "n_failed_tokens": pl.Int32, "simulator_model": pl.String, "method": pl.String, "tokens_in": pl.Int64,
          "tokens_out": pl.Int64, "cost": pl.Float64, "cache_hit": pl.Boolean, "error": pl.String}
NO_SILENT_ZEROS = "no_silent_zero_simulations"


def valid_split(kinds: dict) -> list[tuple[str, int, np.ndarray]]:
    """The scored sequences: 5 valid top records, then 5 valid random records (METHOD.md)."""
    top = split_top(kinds.get("top", []))["valid"]
    random = split_random(kinds.get("random", []))["valid"]
    return [("top", s, a) for s, a in top] + [("random", s, a) for s, a in random]


def build_simulations(layout: Layout, prompt_version: str, fewshot: list[dict]):
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
    def simulations(context: AssetExecutionContext, storage: TableStorage, simulator: LLM) -> MaterializeResult:
        layer_key, _ = layer_and_shard(context)
        explained = storage.read("explanations", context.partition_key)
        records = records_of(storage.read("neuron_records", layer_key, "records"),
                             explained["neuron"].unique().to_list())
        tokens = tokens_by_seq(storage.read("corpus_tokens"))
        rows = []
        try:
            engine, engine_error = simulator.simulation(fewshot, log=context.log.info), None
        except Exception as exc:  # prefix too long, endpoint down: every neuron gets this error row
            engine, engine_error = None, f"simulator unusable: {type(exc).__name__}: {exc}"
        method = engine.method if engine else "none"

        def row(e, seq_id=None, split=None, result=None, error=None):
            result = result or failed_simulation(error)
            expected = result["expected"]
            return {"layer": e["layer"], "neuron": e["neuron"], "variant": e["variant"],
                    "explanation_id": e["explanation_id"], "seq_id": seq_id, "split": split,
                    "expected": None if expected is None else expected.tolist(), "n_failed_tokens": result["n_failed"],
                    "simulator_model": simulator.label, "method": method, "tokens_in": result["tokens_in"],
                    "tokens_out": result["tokens_out"], "cost": result["cost"], "cache_hit": result["cache_hit"],
                    "error": result["error"]}

        progress = Progress(context, explained.height, f"simulating {context.partition_key}, explanations")
        for e in explained.iter_rows(named=True):
            progress.advance()
            if e["error"] is not None or engine_error:
                rows.append(row(e, error=engine_error or f"no explanation: {e['error']}"))
                continue
            sequences = valid_split(records[e["neuron"]])
            try:
                results = engine.simulate(e["text"], [tokens[seq_id] for _, seq_id, _ in sequences])
            except Exception as exc:  # a failed neuron is a row with its error; the shard goes on
                message = f"simulator failed: {type(exc).__name__}: {exc}"
                results = [failed_simulation(message, len(tokens[seq_id])) for _, seq_id, _ in sequences]
            rows += [row(e, seq_id, split, result) for (split, seq_id, _), result in zip(sequences, results)]

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
                "method": method,
                "tokens in": int(df["tokens_in"].sum()),
                "tokens out": int(df["tokens_out"].sum()),
                "cost (USD)": float(df["cost"].sum()),
                "LLM cache hits": int(df["cache_hit"].sum()),
                "LLM cache misses": int((~df["cache_hit"] & (df["tokens_in"] > 0)).sum()),
                "seconds": round(progress.seconds, 1),
                "path": MetadataValue.path(str(storage.path("simulations", context.partition_key))),
            },
            check_results=[AssetCheckResult(check_name=NO_SILENT_ZEROS, **check)],
        )

    return simulations
