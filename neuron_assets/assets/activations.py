"""neuron_records[layer]: top, random, quantile and hard-negative records plus stats for every unit of a layer:
its MLP neurons, or the latents of the sparse coder that reads it (NEURON_ASSETS_UNITS)."""

import hashlib

import numpy as np
import dagster as dg

from neuron_assets.assets.common import CONTENT_HASH, MODEL_SECONDS, OWNERS, PATH, percentiles, progress_log
from neuron_assets.assets.corpus import corpus_tokens
from neuron_assets.automation import ON_CHANGE
from neuron_assets.partitions import Layout, layer_partitions
from neuron_assets.resources.storage import TableStorage
from neuron_assets.resources.study import Study
from neuron_assets.resources.subject_model import SubjectModel
from neuron_assets.stages.capture import LayerRecords, capture_records

ENOUGH_RECORDS = "every_neuron_has_enough_records"


def _layer_metadata(layer: LayerRecords, hookpoint: str, content_hash: str, path: str) -> dict:
    max_activation = layer.stats["max_activation"].to_list()
    hard = layer.hard_per_neuron
    return {"dagster/row_count": layer.records.height, "units": layer.stats.height, "hookpoint": hookpoint,
            "never active (max <= 0)": sum(m <= 0 for m in max_activation),
            **percentiles(max_activation, "max activation"),
            "hard negatives: neurons with >= 1": int((hard > 0).sum()),
            "hard negatives: median per neuron": float(np.median(hard)) if len(hard) else 0.0,
            CONTENT_HASH: content_hash, PATH: dg.MetadataValue.path(path)}


def _enough_records(layers: list[LayerRecords]) -> dg.AssetCheckResult:
    short = [layer.short_neurons() for layer in layers]
    top, random = sum(s["top"] for s in short), sum(s["random"] for s in short)
    return dg.AssetCheckResult(check_name=ENOUGH_RECORDS, passed=top == 0 and random == 0,
                            severity=dg.AssetCheckSeverity.WARN,
                            metadata={"units short of top records": top, "units short of random records": random})


def build_neuron_records(layout: Layout):
    @dg.asset(
        partitions_def=layer_partitions(layout),
        backfill_policy=dg.BackfillPolicy.single_run(),
        # The weights share the layer partitions: identity mapping, layer L reads weights[L].
        deps=[corpus_tokens, "subject_model_weights", "sampling"],
        # 4: the stats column max is max_activation. 5: the stats column active_share. 6: activation_frequency.
        # 7: the output_tokens table. 8: the column neuron is now unit. 9: hard negatives from a window
        # sample. 10: the output_tokens table moved to explanations (only for the units explained)
        code_version="10",
        automation_condition=ON_CHANGE,
        kinds={"pytorch", "parquet"},
        owners=OWNERS,
        group_name="activations",
        check_specs=[dg.AssetCheckSpec(ENOUGH_RECORDS, asset="neuron_records",
                                       description="every neuron has >= 20 top and >= 15 random records")],
        description="Per unit (an MLP neuron, or a sparse coder's latent encoded from its hookpoint in the same "
        "pass): top records (windows with the highest max activation), random "
        "and quantile records, activation stats, and hard negatives (windows holding the neuron's top tokens "
        "that stay under 10% of its peak). One forward pass fills every layer in the run, and one bounded "
        "second pass over the candidate windows of all its layers finds the hard negatives.",
    )
    def neuron_records(
        context: dg.AssetExecutionContext, subject_model: SubjectModel, storage: TableStorage, study: Study
    ) -> dg.MaterializeResult:
        keys = list(context.partition_keys)
        windows = storage.read("corpus_tokens", columns=["token_ids"])["token_ids"]
        captured = capture_records(subject_model, windows.list.to_array(study.seq_len).to_numpy(),
                                   [int(k) for k in keys], study.top_records, study.random_records, study.seed,
                                   progress_log(context), f"layers {keys[0]}..{keys[-1]}")
        hashes = []
        for key, layer in zip(keys, captured.layers.values()):
            hashes.append(storage.write_tables({"records": layer.records, "stats": layer.stats}, "neuron_records", key))
            context.add_asset_metadata(
                _layer_metadata(layer, layout.hookpoint(int(key)), hashes[-1],
                                str(storage.path("neuron_records", key, "records"))),
                partition_key=key)
        # One data version for the run: per layer when the run has one layer (the usual refresh).
        version = hashlib.sha256("".join(hashes).encode()).hexdigest()[:16]
        return dg.MaterializeResult(
            data_version=dg.DataVersion(version),
            metadata={"layers": len(keys), "windows": captured.n_windows,
                      "tokens/s": round(captured.tokens_per_second, 1),
                      "hard negatives: windows in second pass": captured.second_pass_windows,
                      "hard negatives: second pass seconds": round(captured.second_pass_seconds, 1),
                      MODEL_SECONDS: round(captured.model_seconds, 1), "subject model": subject_model.label},
            check_results=[_enough_records(list(captured.layers.values()))],
        )

    return neuron_records
