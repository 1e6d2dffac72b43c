"""The published per-neuron JSON files (docs/method.md, Interchange): exported_neurons[layer] writes them,
imported_explanations[layer|shard] reads explanations in that layout and scores them beside ours."""

import json

import numpy as np
import polars as pl
import dagster as dg
from upath import UPath

from neuron_assets.assets.common import OWNERS, layer_and_shard, markdown_table, previous_rows
from neuron_assets.automation import ON_CHANGE
from neuron_assets.partitions import Layout, layer_partitions, layer_shard_partitions
from neuron_assets.resources.files import write_atomic
from neuron_assets.resources.storage import TableStorage
from neuron_assets.resources.study import Study
from neuron_assets.stages.explain import SCHEMA, previous_units
from neuron_assets.stages.interchange import IMPORT_SETTING, export_neurons, import_explanations
from neuron_assets.stages.records import tokens_by_seq


def build_imported_explanations(layout: Layout, root: str):
    @dg.asset(
        partitions_def=layer_shard_partitions(layout),
        # neuron_records: a 'top:N:<statistic>' selection ranks the shard's neurons by its stats
        deps=["import_source", "neuron_selection",
              dg.AssetDep("neuron_records", partition_mapping=dg.MultiToSingleDimensionPartitionMapping("layer"))],
        code_version="2",  # 2: the column neuron is now unit (donor_neuron: donor_unit)
        kinds={"json", "parquet"},
        owners=OWNERS,
        group_name="explanations",
        description=f"The 'imported' variant: for each neuron of the shard, the first explanation of "
        f"`explanations/<layer>/<neuron>.jsonl` under {IMPORT_SETTING} (the published layout, local or "
        "s3://), simulated and scored by our simulator beside our own variants. A missing or malformed "
        "file is a row with an error.",
    )
    def imported_explanations(context: dg.AssetExecutionContext, storage: TableStorage, study: Study) -> dg.MaterializeResult:
        layer_key, shard_key = layer_and_shard(context)
        # a narrower selection keeps the neurons imported before: their files are read again
        stats = storage.read("neuron_records", layer_key, "stats") if study.ranks_by_stats else None
        neurons = {*study.selected(layout.shard_neurons(shard_key), stats),
                   *previous_units(previous_rows(storage, "imported_explanations", context.partition_key))}
        result = import_explanations(root, int(layer_key), sorted(neurons),
                                     context.assets_def.code_versions_by_key[context.asset_key])
        df = pl.DataFrame(result.rows, schema=SCHEMA).sort("unit")
        version = storage.write(df, "imported_explanations", context.partition_key)
        errors = int(df["error"].is_not_null().sum())
        finite = [s for s in result.reported_scores if s is not None]
        return dg.MaterializeResult(
            data_version=dg.DataVersion(version),
            metadata={
                "dagster/row_count": df.height,
                "imported": df.height - errors,
                "errors": errors,
                "source": root,
                "mean score reported in the files": float(np.mean(finite)) if finite else float("nan"),
                "preview": markdown_table(df.select("unit", "text", "error").head(10)),
            },
        )

    return imported_explanations


def build_exported_neurons(layout: Layout):
    @dg.asset(
        partitions_def=layer_partitions(layout),
        # neuron_records is read too, but reaches this asset through scores: a direct edge would make
        # the automation export new records beside old scores before the scores rerun.
        deps=[dg.AssetDep(name, partition_mapping=dg.MultiToSingleDimensionPartitionMapping("layer"))
              for name in ("scores", "simulations")],
        # 2: activation_scale "simulated_normalized_activations" (the published value); a failed token
        # written as 0, not null; the calibration split is not exported. 3: units.json names the units
        code_version="3",
        automation_condition=ON_CHANGE,
        kinds={"json"},
        owners=OWNERS,
        group_name="summaries",
        description="Every scored unit of the layer in the published layout: "
        "`collated-activations/<layer>/<unit>.json` (records and stats) and "
        "`explanations/<layer>/<unit>.jsonl` (each variant's explanation, llm first, with its "
        "valid-split simulation and scores: the scores table's), whose neuron_index is the unit; "
        "`units/<layer>.json` says what the units are (hookpoint: 'mlp' or the coder's). Controls are not exported.",
    )
    def exported_neurons(context: dg.AssetExecutionContext, storage: TableStorage) -> dg.MaterializeResult:
        layer_key = context.partition_key
        present = [f"{layer_key}|{s}" for s in layout.shard_keys() if storage.exists("scores", f"{layer_key}|{s}")]
        if not present:
            raise FileNotFoundError(f"layer {layer_key} has no scores yet: materialize scores for its shards first")
        root = UPath(storage.root) / "exported_neurons"
        result = export_neurons(
            int(layer_key), pl.concat([storage.read("scores", p) for p in present]),
            pl.concat([storage.read("simulations", p) for p in present]),
            storage.read("neuron_records", layer_key, "records"), storage.read("neuron_records", layer_key, "stats"),
            tokens_by_seq(storage.read("corpus_tokens")),
            write=lambda relative, text: write_atomic(root / relative, text.encode()))
        # the published layout calls every unit a neuron: say what this layer's units are
        layer = int(layer_key)
        write_atomic(root / "units" / f"{layer}.json", json.dumps(
            {"layer": layer, "hookpoint": layout.hookpoint(layer), "units_per_layer": layout.n_units}).encode())
        return dg.MaterializeResult(
            metadata={
                "units": result.neurons,
                "hookpoint": layout.hookpoint(layer),
                "files": 2 * result.neurons + 1,
                "variants": ", ".join(result.variants),
                "path": dg.MetadataValue.path(str(root)),
                "import with": f"{IMPORT_SETTING}={root}",
            },
        )

    return exported_neurons
