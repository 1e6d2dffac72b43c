"""neuron_records[layer]: top, random, quantile and hard-negative records plus stats for every MLP neuron."""

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import polars as pl
from dagster import (
    AssetCheckResult,
    AssetCheckSeverity,
    AssetCheckSpec,
    AssetExecutionContext,
    BackfillPolicy,
    DataVersion,
    MaterializeResult,
    MetadataValue,
    asset,
)

from neuron_assets.assets.common import OWNERS, percentiles
from neuron_assets.assets.corpus import corpus_tokens
from neuron_assets.automation import ON_CHANGE
from neuron_assets.method.records import (
    HARD_NEGATIVE,
    RecordSampler,
    add_records,
    hard_negative_collector,
)
from neuron_assets.partitions import Layout, layer_partitions
from neuron_assets.resources.storage import TableStorage
from neuron_assets.resources.study import Study
from neuron_assets.resources.subject_model import SubjectModel
from neuron_assets.stages.timing import ModelClock, Progress

RECORDS_SCHEMA = {"neuron": pl.Int32, "kind": pl.String, "rank": pl.Int32, "seq_id": pl.Int32,
                  "activations": pl.List(pl.Float32)}
STATS_SCHEMA = {"neuron": pl.Int32, "mean": pl.Float64, "variance": pl.Float64, "skewness": pl.Float64,
                "kurtosis": pl.Float64, "max": pl.Float64, "n_tokens": pl.Int64,
                "quantile_boundaries": pl.List(pl.Float64)}
ENOUGH_RECORDS = "every_neuron_has_enough_records"
SPLIT_TOP, SPLIT_RANDOM = 20, 15  # 4 top splits and 3 random splits of 5 records (docs/method.md)


def _tables(records: dict, stats: dict) -> tuple[pl.DataFrame, pl.DataFrame]:
    # a 2D array becomes a fixed-width column in one copy; a list of row arrays is 10x slower
    records["activations"] = pl.Series(records["activations"]).cast(pl.List(pl.Float32))
    return pl.DataFrame(records, schema=RECORDS_SCHEMA), pl.DataFrame(stats, schema=STATS_SCHEMA)


def _short_neurons(records: pl.DataFrame, n_neurons: int) -> dict[str, int]:
    """How many neurons have fewer top / random records than the splits need."""
    counts = records.group_by("neuron", "kind").len()
    out = {}
    for kind, need in (("top", SPLIT_TOP), ("random", SPLIT_RANDOM)):
        enough = counts.filter((pl.col("kind") == kind) & (pl.col("len") >= need)).height
        out[kind] = n_neurons - enough
    return out


def _store_layer(storage: TableStorage, key: str, records: dict, stats: dict, hard: dict, n_neurons: int) -> dict:
    """Write one layer's two tables (sampler records + hard negatives) and return what the metadata needs."""
    hard_per_neuron = np.bincount(hard["neuron"], minlength=n_neurons)
    records, stats = _tables(add_records(records, hard), stats)
    versions = (storage.write(records, "neuron_records", key, "records"),
                storage.write(stats, "neuron_records", key, "stats"))
    return {"rows": records.height, "short": _short_neurons(records, n_neurons),
            "max": stats["max"].to_list(), "content hash": "".join(versions),
            "hard": {"hard negatives: neurons with >= 1": int((hard_per_neuron > 0).sum()),
                     "hard negatives: median per neuron": float(np.median(hard_per_neuron)) if n_neurons else 0.0}}


def build_neuron_records(layout: Layout):
    @asset(
        partitions_def=layer_partitions(layout),
        backfill_policy=BackfillPolicy.single_run(),
        # The weights share the layer partitions: identity mapping, layer L reads weights[L].
        deps=[corpus_tokens, "subject_model_weights", "sampling"],
        code_version="3",
        automation_condition=ON_CHANGE,
        kinds={"pytorch", "parquet"},
        owners=OWNERS,
        group_name="activations",
        check_specs=[AssetCheckSpec(ENOUGH_RECORDS, asset="neuron_records",
                                    description="every neuron has >= 20 top and >= 15 random records")],
        description="Per MLP neuron: top records (windows with the highest max activation), random "
        "and quantile records, activation stats, and hard negatives (windows holding the neuron's top tokens "
        "that stay under 10% of its peak). One forward pass fills every layer in the run, and one bounded "
        "second pass over the candidate windows of all its layers finds the hard negatives.",
    )
    def neuron_records(
        context: AssetExecutionContext, subject_model: SubjectModel, storage: TableStorage, study: Study
    ) -> MaterializeResult:
        keys = list(context.partition_keys)
        layers = [int(k) for k in keys]
        windows = storage.read("corpus_tokens", columns=["token_ids"])["token_ids"]
        token_ids = windows.list.to_array(study.seq_len).to_numpy()
        n_neurons = subject_model.shape().n_neurons
        samplers = {
            layer: RecordSampler(n_neurons, study.seq_len, n_top=study.top_records,
                                 n_random=study.random_records,
                                 quantile_pool=max(50, study.random_records), seed=study.seed * 1000 + layer)
            for layer in layers
        }
        progress = Progress(context.log.info, len(token_ids), f"forward pass, layers {keys[0]}..{keys[-1]}, windows")
        clock = ModelClock()
        # numpy releases the GIL inside its loops, so the layers' samplers run side by side
        with ThreadPoolExecutor(max_workers=min(len(layers), os.cpu_count() or 1)) as pool:
            for start, acts in clock.timed(subject_model.neuron_activations(token_ids, layers)):
                seq_ids = np.arange(start, start + len(acts[layers[0]]))
                list(pool.map(lambda layer, a=acts, s=seq_ids: samplers[layer].update(a[layer], s), layers))
                progress.advance(len(seq_ids))
            first_pass_s = progress.seconds
            # finalizing the layers side by side too; each frees its sampler
            final = dict(zip(layers, pool.map(lambda layer: samplers.pop(layer).finalize(), layers)))
            # hard negatives: one second pass over the union of every layer's candidate windows (all drawn
            # from one window sample of at most 20,000, so the pass is bounded whatever the corpus size)
            hard = dict(zip(layers, pool.map(
                lambda layer: hard_negative_collector(final[layer][0], n_neurons, token_ids,
                                                      seed=study.seed * 1000 + layer, sample_seed=study.seed),
                layers)))
            union = np.unique(np.concatenate([hard[layer].windows() for layer in layers]))
            second = Progress(context.log.info, len(union), f"second pass ({HARD_NEGATIVE}), layers {keys[0]}..{keys[-1]}, "
                              "windows")
            for start, acts in clock.timed(subject_model.neuron_activations(token_ids[union], layers)):
                seq_ids = union[start : start + len(acts[layers[0]])]
                list(pool.map(lambda layer, a=acts, s=seq_ids: hard[layer].update(a[layer], s), layers))
                second.advance(len(seq_ids))
            stored = list(pool.map(
                lambda key, layer: _store_layer(storage, key, *final.pop(layer), hard.pop(layer).finalize(), n_neurons),
                keys, layers))
        tokens_per_s = token_ids.size / max(first_pass_s, 1e-9)

        short = {kind: sum(layer["short"][kind] for layer in stored) for kind in ("top", "random")}
        for key, layer in zip(keys, stored):
            context.add_asset_metadata(
                {
                    "dagster/row_count": layer["rows"],
                    "neurons": n_neurons,
                    "never active (max <= 0)": sum(m <= 0 for m in layer["max"]),
                    **percentiles(layer["max"], "max activation"),
                    **layer["hard"],
                    "content hash": layer["content hash"],
                    "path": MetadataValue.path(str(storage.path("neuron_records", key, "records"))),
                },
                partition_key=key,
            )
        hashes = [layer["content hash"] for layer in stored]
        # One data version for the run: per layer when the run has one layer (the usual refresh).
        version = hashlib.sha256("".join(hashes).encode()).hexdigest()[:16]
        return MaterializeResult(
            data_version=DataVersion(version),
            metadata={"layers": len(layers), "windows": len(token_ids), "tokens/s": round(tokens_per_s, 1),
                      "hard negatives: windows in second pass": len(union),
                      "hard negatives: second pass seconds": round(second.seconds, 1),
                      "model seconds": round(clock.seconds, 1), "subject model": subject_model.label},
            check_results=[
                AssetCheckResult(
                    check_name=ENOUGH_RECORDS,
                    passed=short["top"] == 0 and short["random"] == 0,
                    severity=AssetCheckSeverity.WARN,
                    metadata={"neurons short of top records": short["top"],
                              "neurons short of random records": short["random"]},
                )
            ],
        )

    return neuron_records
