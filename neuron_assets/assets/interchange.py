"""The published per-neuron JSON files (docs/method.md, Interchange): exported_neurons[layer] writes them,
imported_explanations[layer|shard] reads explanations in that layout and scores them beside ours."""

import hashlib

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
from upath import UPath

from neuron_assets.assets.common import (
    CONTROL_ROWS,
    OWNERS,
    layer_and_shard,
    markdown_table,
)
from neuron_assets.automation import ON_CHANGE
from neuron_assets.method.interchange import (
    dumps,
    file_paths,
    neuron_record,
    read_explanations,
    simulation_results,
)
from neuron_assets.partitions import Layout, layer_partitions, layer_shard_partitions
from neuron_assets.resources.files import s3_errors, write_atomic
from neuron_assets.resources.storage import TableStorage
from neuron_assets.resources.study import Study
from neuron_assets.stages.explain import SCHEMA, explanation_row
from neuron_assets.stages.records import tokens_by_seq

IMPORT_SETTING = "NEURON_ASSETS_IMPORT_FROM"
EXPORT_ORDER = ("llm", "revised", "token_baseline", "imported")  # the first is what an importer takes


def build_imported_explanations(layout: Layout, root: str):
    @asset(
        partitions_def=layer_shard_partitions(layout),
        deps=["import_source", "neuron_selection"],
        code_version="1",
        kinds={"json", "parquet"},
        owners=OWNERS,
        group_name="explanations",
        description=f"The 'imported' variant: for each neuron of the shard, the first explanation of "
        f"`explanations/<layer>/<neuron>.jsonl` under {IMPORT_SETTING} (the published layout, local or "
        "s3://), simulated and scored by our simulator beside our own variants. A missing or malformed "
        "file is a row with an error.",
    )
    def imported_explanations(context: AssetExecutionContext, storage: TableStorage, study: Study) -> MaterializeResult:
        layer_key, shard_key = layer_and_shard(context)
        layer = int(layer_key)
        rows, reported = [], []
        for neuron in study.selected(layout.shard_neurons(shard_key)):
            path = UPath(root) / file_paths(layer, neuron)[1]
            with s3_errors(str(path), "read", IMPORT_SETTING):
                text = path.read_text(encoding="utf-8") if path.exists() else None
            if text is None:
                error = f"no file {path}: export it there or change {IMPORT_SETTING}"
                rows.append(explanation_row(layer, neuron, "imported", None, f"imported from {root}", "", None,
                                            error=error))
                continue
            digest = hashlib.sha256(text.encode()).hexdigest()[:16]  # the file's version, in the lineage
            try:
                first = read_explanations(text, str(path))[0]
                if first["neuron_id"] != (layer, neuron):
                    raise ValueError(f"{path}: holds neuron {first['neuron_id']}, expected ({layer}, {neuron})")
            except (ValueError, IndexError) as e:
                message = str(e) if isinstance(e, ValueError) else f"{path}: no explanation in the file"
                rows.append(explanation_row(layer, neuron, "imported", None, f"imported from {root}", digest, None,
                                            error=message))
                continue
            rows.append(explanation_row(layer, neuron, "imported", first["explanation"] or None,
                                        f"imported from {root}", digest, None,
                                        error=None if first["explanation"] else f"{path}: empty explanation"))
            reported.append(first["score"])
        df = pl.DataFrame([{**r, "code_version": "1"} for r in rows], schema=SCHEMA).sort("neuron")
        version = storage.write(df, "imported_explanations", context.partition_key)
        finite = [s for s in reported if s is not None]
        return MaterializeResult(
            data_version=DataVersion(version),
            metadata={
                "dagster/row_count": df.height,
                "imported": df.height - int(df["error"].is_not_null().sum()),
                "errors": int(df["error"].is_not_null().sum()),
                "source": root,
                "mean score reported in the files": float(np.mean(finite)) if finite else float("nan"),
                "preview": markdown_table(df.select("neuron", "text", "error").head(10)),
            },
        )

    return imported_explanations


def _variant_order(variant: str) -> tuple[int, str]:
    return (EXPORT_ORDER.index(variant) if variant in EXPORT_ORDER else len(EXPORT_ORDER), variant)


def _scored(scores: pl.DataFrame, sims: pl.DataFrame, truth: dict, tokens: dict) -> list[dict]:
    """One neuron's explanations with their valid-split simulations, in EXPORT_ORDER."""
    out = []
    for row in sorted(scores.iter_rows(named=True), key=lambda r: _variant_order(r["variant"])):
        mine = sims.filter((pl.col("variant") == row["variant"]) & pl.col("expected").is_not_null())
        if row["explanation"] is None or mine.height == 0:
            continue
        sequences = [{"tokens": tokens[s], "expected": np.asarray(e, np.float32), "true": truth[split][s]}
                     for split, s, e in mine.sort("split", descending=True).select("split", "seq_id", "expected")
                     .iter_rows()]
        out.append({"explanation": row["explanation"], "sequences": sequences,
                    "scores": {k: row[k] for k in ("score_all", "rsquared", "abs_dev_explained")}})
    return out


def build_exported_neurons(layout: Layout):
    @asset(
        partitions_def=layer_partitions(layout),
        # neuron_records is read too, but reaches this asset through scores: a direct edge would make
        # the automation export new records beside old scores before the scores rerun.
        deps=[AssetDep(name, partition_mapping=MultiToSingleDimensionPartitionMapping("layer"))
              for name in ("scores", "simulations")],
        code_version="1",
        automation_condition=ON_CHANGE,
        kinds={"json"},
        owners=OWNERS,
        group_name="summaries",
        description="Every scored neuron of the layer in the published layout: "
        "`collated-activations/<layer>/<neuron>.json` (records and stats) and "
        "`explanations/<layer>/<neuron>.jsonl` (each variant's explanation, llm first, with its "
        "valid-split simulation and scores). Controls are not exported.",
    )
    def exported_neurons(context: AssetExecutionContext, storage: TableStorage) -> MaterializeResult:
        layer_key = context.partition_key
        layer = int(layer_key)
        present = [f"{layer_key}|{s}" for s in layout.shard_keys() if storage.exists("scores", f"{layer_key}|{s}")]
        if not present:
            raise FileNotFoundError(f"layer {layer_key} has no scores yet: materialize scores for its shards first")
        scores = pl.concat([storage.read("scores", p) for p in present]).filter(~CONTROL_ROWS)
        sims = pl.concat([storage.read("simulations", p) for p in present]).filter(
            ~CONTROL_ROWS)
        neurons = sorted(scores["neuron"].unique().to_list())
        records = storage.read("neuron_records", layer_key, "records").filter(pl.col("neuron").is_in(neurons))
        stats = {r["neuron"]: r for r in storage.read("neuron_records", layer_key, "stats").filter(
            pl.col("neuron").is_in(neurons)).iter_rows(named=True)}
        tokens = tokens_by_seq(storage.read("corpus_tokens"))
        root = UPath(storage.root) / "exported_neurons"
        written = 0
        for (neuron,), rows in records.sort("neuron", "kind", "rank").group_by("neuron", maintain_order=True):
            kinds: dict[str, list] = {}
            for kind, seq_id, acts in rows.select("kind", "seq_id", "activations").iter_rows():
                kinds.setdefault(kind, []).append((seq_id, np.asarray(acts, np.float32)))
            quantiles = sorted(k for k in kinds if k.startswith("quantile_"))
            record = neuron_record(layer, neuron, [(tokens[s], a) for s, a in kinds.get("top", [])],
                                   [(tokens[s], a) for s, a in kinds.get("random", [])],
                                   [[(tokens[s], a) for s, a in kinds[q]] for q in quantiles], stats[neuron])
            truth = {kind: dict(pairs) for kind, pairs in kinds.items()}
            results = simulation_results(layer, neuron, _scored(scores.filter(pl.col("neuron") == neuron),
                                                                sims.filter(pl.col("neuron") == neuron), truth, tokens))
            for relative, obj in zip(file_paths(layer, neuron), (record, results)):
                write_atomic(root / relative, (dumps(obj) + "\n").encode())
            written += 1
        return MaterializeResult(
            metadata={
                "neurons": written,
                "files": 2 * written,
                "variants": ", ".join(sorted(set(scores["variant"]), key=_variant_order)),
                "path": MetadataValue.path(str(root)),
                "import with": f"{IMPORT_SETTING}={root}",
            },
        )

    return exported_neurons
