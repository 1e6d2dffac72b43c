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
    TableColumn,
    TableSchema,
    asset,
)

from neuron_assets.assets.common import (
    OWNERS,
    layer_and_shard,
    previous_rows,
)
from neuron_assets.assets.corpus import corpus_tokens
from neuron_assets.assets.explanations import explanation_variants
from neuron_assets.automation import ON_CHANGE
from neuron_assets.checks import no_silent_zero_simulations
from neuron_assets.method.records import split_random, split_top
from neuron_assets.partitions import Layout, layer_shard_partitions
from neuron_assets.resources.llm import LLM, failed_simulation
from neuron_assets.resources.storage import TableStorage
from neuron_assets.resources.study import Study
from neuron_assets.stages.records import records_of, tokens_by_seq
from neuron_assets.stages.timing import ModelClock, Progress

SCHEMA = {"layer": pl.Int32, "neuron": pl.Int32, "variant": pl.String, "explanation_id": pl.String,
          "seq_id": pl.Int32, "split": pl.String, "expected": pl.List(pl.Float32),
          "n_failed_tokens": pl.Int32, "simulator_model": pl.String, "simulator_version": pl.String,
          "method": pl.String, "tokens_in": pl.Int64,
          "tokens_out": pl.Int64, "cost": pl.Float64, "cache_hit": pl.Boolean,
          "code_version": pl.String, "error": pl.String}
NO_SILENT_ZEROS = "no_silent_zero_simulations"


def valid_split(kinds: dict) -> list[tuple[str, int, np.ndarray]]:
    """The scored sequences: 5 valid top records, then 5 valid random records (docs/method.md)."""
    top = split_top(kinds.get("top", []))["valid"]
    random = split_random(kinds.get("random", []))["valid"]
    return [("top", s, a) for s, a in top] + [("random", s, a) for s, a in random]


def reusable_simulations(previous: pl.DataFrame | None, simulator_version: str, code_version: str) -> dict:
    """{(neuron, variant): rows} of earlier simulations that succeeded with the same simulator
    version (backend, model, endpoint, method setting) and code; a neuron's rows are reused when its
    explanation and sequences are unchanged."""
    if previous is None or "simulator_version" not in previous.columns:
        return {}
    ok = previous.filter((pl.col("simulator_version") == simulator_version) & (pl.col("code_version") == code_version))
    groups = ok.partition_by("neuron", "variant", as_dict=True)
    return {key: rows for key, rows in groups.items() if rows["error"].is_null().all()}


def build_simulations(layout: Layout, prompt_version: str, fewshot: list[dict], sources: list[str], control: bool):
    """`sources`: the explanation assets whose variants are simulated; `control`: also their
    shuffled controls."""

    @asset(
        partitions_def=layer_shard_partitions(layout),
        deps=[*sources,
              AssetDep("neuron_records", partition_mapping=MultiToSingleDimensionPartitionMapping("layer")),
              corpus_tokens, "simulator", "sampling", "controls"],
        # 2: shuffled controls and several explanation sources. 3: simulator_version decides reuse.
        code_version=f"3-{prompt_version}",
        automation_condition=ON_CHANGE,
        kinds={"pytorch", "parquet"},
        owners=OWNERS,
        group_name="simulations",
        pool="llm",
        check_specs=[AssetCheckSpec(NO_SILENT_ZEROS, asset="simulations",
                                    description="a failed simulation is an error row, never zeros")],
        description="Expected activation (0-10) of each token of the valid split (5 top + 5 random "
        "records), read all at once from the simulator's value distribution, for every explanation "
        "variant and its shuffled control (`<variant>_shuffled`: another neuron's explanation). Failed "
        "tokens are NaN and counted; failed sequences are rows with an error.",
    )
    def simulations(
        context: AssetExecutionContext, storage: TableStorage, simulator: LLM, study: Study
    ) -> MaterializeResult:
        layer_key, _ = layer_and_shard(context)
        explained = explanation_variants(storage, sources, context.partition_key, study.seed, control)
        records = records_of(storage.read("neuron_records", layer_key, "records"),
                             explained["neuron"].unique().to_list())
        tokens = tokens_by_seq(storage.read("corpus_tokens"))
        code_version = context.assets_def.code_versions_by_key[context.asset_key]
        simulator_version = simulator.version("simulator")
        earlier = reusable_simulations(previous_rows(storage, "simulations", context.partition_key),
                                       simulator_version, code_version)
        engine, engine_error, rows, reused, calls, hits = None, None, [], 0, 0, 0

        def row(e, method, seq_id=None, split=None, result=None, error=None):
            result = result or failed_simulation(error)
            expected = result["expected"]
            return {"layer": e["layer"], "neuron": e["neuron"], "variant": e["variant"],
                    "explanation_id": e["explanation_id"], "seq_id": seq_id, "split": split,
                    "expected": None if expected is None else expected.tolist(), "n_failed_tokens": result["n_failed"],
                    "simulator_model": simulator.label, "simulator_version": simulator_version, "method": method, "tokens_in": result["tokens_in"],
                    "tokens_out": result["tokens_out"], "cost": result["cost"], "cache_hit": result["cache_hit"],
                    "code_version": code_version, "error": result["error"]}

        progress = Progress(context.log.info, explained.height, f"simulating {context.partition_key}, explanations")
        clock = ModelClock()
        for e in explained.iter_rows(named=True):
            progress.advance()
            if e["error"] is not None:
                rows.append(row(e, "none", error=f"no explanation: {e['error']}"))
                continue
            sequences = valid_split(records[e["neuron"]])
            before = earlier.get((e["neuron"], e["variant"]))
            if (before is not None and before["explanation_id"][0] == e["explanation_id"]
                    and set(before.select("split", "seq_id").rows()) == {(sp, s) for sp, s, _ in sequences}):
                rows += before.to_dicts()  # no LLM call, and identical rows
                reused += 1
                continue
            if engine is None and engine_error is None:  # loaded (or probed) only when needed
                try:
                    engine = simulator.simulation(fewshot, log=context.log.info)
                except Exception as exc:  # prefix too long, endpoint down: every neuron gets this error
                    engine_error = f"simulator unusable: {type(exc).__name__}: {exc}"
            if engine_error:
                rows.append(row(e, "none", error=engine_error))
                continue
            calls += len(sequences)
            try:
                with clock.running():
                    results = engine.simulate(e["text"], [tokens[seq_id] for _, seq_id, _ in sequences])
            except Exception as exc:  # a failed neuron is a row with its error; the shard goes on
                message = f"simulator failed: {type(exc).__name__}: {exc}"
                results = [failed_simulation(message, len(tokens[seq_id])) for _, seq_id, _ in sequences]
            hits += sum(result["cache_hit"] for result in results)
            rows += [row(e, engine.method, seq_id, split, result)
                     for (split, seq_id, _), result in zip(sequences, results)]

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
                "method": ", ".join(sorted(set(df["method"]))),
                "reused (unchanged inputs)": reused,
                "tokens in": int(df["tokens_in"].sum()),
                "tokens out": int(df["tokens_out"].sum()),
                "cost (USD)": float(df["cost"].sum()),
                "sequences simulated now": calls,
                "LLM cache hits": hits,
                "LLM cache misses": calls - hits,
                "seconds": round(progress.seconds, 1),
                "model seconds": round(clock.seconds, 1),
                "path": MetadataValue.path(str(storage.path("simulations", context.partition_key))),
                "dagster/column_schema": TableSchema(columns=[TableColumn(c, str(t)) for c, t in SCHEMA.items()]),
            },
            check_results=[AssetCheckResult(check_name=NO_SILENT_ZEROS, **check)],
        )

    return simulations
