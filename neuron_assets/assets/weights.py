"""subject_model_weights[layer]: an observable source asset, one data version per layer's weights.

Observing it hashes, per requested layer, the parameters its results are computed from (chained:
those outside the layers, then layers 0..L; resources/models.py `layer_weight_hashes`) from the
checkpoint files on disk. A checkpoint that changes layer L (a fine-tune, an edit) gives layers L
and up a new data version, so only their neuron_records partitions, and what is downstream of
them, become stale. With sparse coders as the units (NEURON_ASSETS_UNITS), a layer's version also
hashes its coder's files: a retrained coder for layer L makes layer L stale, and no other.
"""

import dagster as dg

from neuron_assets.partitions import Layout, layer_partitions
from neuron_assets.resources.subject_model import SubjectModel


def build_subject_model_weights(layout: Layout):
    all_keys = [layout.layer_key(i) for i in layout.layers]

    @dg.observable_source_asset(
        partitions_def=layer_partitions(layout),
        group_name="activations",
        tags={"dagster/kind/pytorch": "", "dagster/kind/safetensors": ""},
        description="The subject model's weights, one partition per layer. Observing it records, per "
        "layer, a hash (sha256, 16 hex) of the names, shapes, dtypes and bytes of the parameters that "
        "layer's activations come from (outside the layers, then layers 0..L, chained), read from the "
        "checkpoint on disk. A new checkpoint in which layer L differs makes layers L and up of "
        "neuron_records stale, and the layers below it not. With sparse coders as the units, each layer's "
        "version also hashes its coder's cfg.json and weights: a retrained coder makes its layer stale. Observed by the nightly schedule "
        "`observe_sources_nightly`, by `neuron-assets refresh`, or with 'Observe' in the UI.",
    )
    def subject_model_weights(context, subject_model: SubjectModel) -> dg.DataVersionsByPartition:
        selected = context.has_partition_key or context.has_partition_key_range
        keys = list(context.partition_keys) if selected else all_keys  # no selection: every layer
        hashes = subject_model.layer_hashes([int(k) for k in keys])
        context.log.info("weight hashes: " + ", ".join(f"{k} ({layout.hookpoint(int(k))})={hashes[int(k)]}"
                                                       for k in keys))
        return dg.DataVersionsByPartition({k: dg.DataVersion(hashes[int(k)]) for k in keys})

    return subject_model_weights
