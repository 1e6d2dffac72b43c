"""neuron_viewer[layer] -> neuron_viewer_index: the static HTML neuron viewer (`neuron_assets/viewer.py`
renders it; these assets read the tables and write the pages under `viewer_page(root, layer)`)."""

import hashlib

import numpy as np
import polars as pl
import dagster as dg
from upath import UPath

from neuron_assets.assets.common import OWNERS, viewer_page
from neuron_assets.assets.scores import quality_report, viewer_link
from neuron_assets.automation import ON_SCORES_CHANGE
from neuron_assets.explorer import load_explained, run_windows, top_explained
from neuron_assets.method.controls import SUFFIX, is_control
from neuron_assets.method.records import split_random, split_top
from neuron_assets.partitions import Layout, layer_partitions
from neuron_assets.resources.files import s3_errors, write_atomic
from neuron_assets.resources.storage import TableStorage
from neuron_assets.resources.subject_model import SubjectModel
from neuron_assets.stages.records import records_of
from neuron_assets.stages.variants import CONTROL_ROWS
from neuron_assets.viewer import index_page, layer_page

# Neurons with a section of records on a layer page (the table lists every scored neuron): the
# best by score_all. A section is 10 records x seq_len tokens x (1 + variants) spans, about 250 KB
# at seq_len 64 with two variants, so a page stays under about 25 MB whatever the layer's size.
MAX_SECTIONS = 100
EXCERPTS = 3  # corpus windows in the index's token explorer view
TOP_PER_TOKEN = 3
SHOWN_RECORDS = 5  # top and random records per neuron: the valid split (what the scores use)


def _variant_key(variant: str) -> tuple:
    real = variant.removesuffix(SUFFIX)
    return (is_control(variant), real != "llm", real)


def _write_page(path: str, page: str) -> str:
    payload = page.encode("utf-8")
    target = UPath(path)
    write_atomic(target, payload)  # with the process's umask, like every other file
    return hashlib.sha256(payload).hexdigest()[:16]


def _valid(kinds: dict, kind: str) -> list:
    """The valid split of a neuron's top or random records (what the simulations and scores use);
    the first records where there are too few for the splits."""
    shown = kinds.get(kind, [])
    try:
        return (split_top(shown) if kind == "top" else split_random(shown))["valid"]
    except ValueError:
        return shown[:SHOWN_RECORDS]


def _section_neurons(scores: pl.DataFrame, limit: int) -> list[int]:
    """The neurons with a section: all of them, or the `limit` best by their best real score_all."""
    best = (scores.filter(~CONTROL_ROWS)
            .group_by("unit").agg(pl.col("score_all").fill_nan(None).max().alias("best"))
            .sort(["best", "unit"], descending=[True, False], nulls_last=True))
    return sorted(best["unit"].head(limit).to_list())


def layer_neurons(scores: pl.DataFrame, sims: pl.DataFrame, records: pl.DataFrame, stats: pl.DataFrame,
                  tokens: dict[int, list[str]], limit: int = MAX_SECTIONS) -> list[dict]:
    """The `layer_page` data of one layer: every scored neuron's variants; records, simulations and
    stats for the neurons with a section."""
    detailed = set(_section_neurons(scores, limit))
    recs = records_of(records, sorted(detailed))
    stat = {r["unit"]: r for r in stats.filter(pl.col("unit").is_in(list(detailed))).iter_rows(named=True)}
    simulated: dict[int, dict[tuple[str, int], list]] = {}
    for neuron, variant, seq_id, expected in sims.filter(
            pl.col("unit").is_in(list(detailed)) & pl.col("expected").is_not_null()
            & ~CONTROL_ROWS).select("unit", "variant", "seq_id", "expected").iter_rows():
        simulated.setdefault(neuron, {})[(variant, seq_id)] = expected
    out = []
    for (neuron,), rows in scores.sort("unit").group_by("unit", maintain_order=True):
        variants = sorted(rows.iter_rows(named=True), key=lambda r: _variant_key(r["variant"]))
        entry = {"unit": neuron, "variants": variants, "detail": neuron in detailed}
        if neuron in detailed:
            sims_here = simulated.get(neuron, {})
            entry["simulated_variants"] = sorted({v for v, _ in sims_here}, key=_variant_key)
            for kind in ("top", "random"):
                entry[kind] = [{"seq_id": s, "tokens": tokens[s], "activations": a.tolist(),
                                "simulated": {v: sims_here[(v, s)] for v in entry["simulated_variants"]
                                              if (v, s) in sims_here}}
                               for s, a in _valid(recs[neuron], kind)]
            entry["stats"] = stat.get(neuron)
        out.append(entry)
    return out


def build_neuron_viewer(layout: Layout):
    @dg.asset(
        partitions_def=layer_partitions(layout),
        deps=[*(dg.AssetDep(name, partition_mapping=dg.MultiToSingleDimensionPartitionMapping("layer"))
                for name in ("scores", "simulations", "explanations")), "neuron_records", "corpus_tokens"],
        code_version="3",  # 2: the stats table shows max_activation (was max). 3: units, their hookpoint
        automation_condition=ON_SCORES_CHANGE,
        kinds={"html"},
        owners=OWNERS,
        group_name="viewer",
        description="One self-contained HTML page per layer (no network request: CSS and JS inline): a "
        "sortable, filterable table of every scored neuron (variant, score_all, score_top, score_random, "
        "explanation) and, for the best neurons by score_all (at most 100), a section with the explanations "
        "and scores per variant, the valid-split top and random records with each token shaded by its real "
        "activation and, under it, by each variant's simulated activation, and the activation stats. "
        "Reads only the shards whose scores exist.",
    )
    def neuron_viewer(context: dg.AssetExecutionContext, storage: TableStorage) -> dg.MaterializeResult:
        layer_key = context.partition_key
        present = [f"{layer_key}|{s}" for s in layout.shard_keys() if storage.exists("scores", f"{layer_key}|{s}")]
        if not present:
            raise FileNotFoundError(f"layer {layer_key} has no scores yet: materialize scores for its shards first")
        scores = pl.concat([storage.read("scores", p) for p in present], how="diagonal_relaxed")
        sims = pl.concat([storage.read("simulations", p) for p in present if storage.exists("simulations", p)],
                         how="diagonal_relaxed")
        neurons_scored = sorted(scores["unit"].unique().to_list())
        records = storage.read("neuron_records", layer_key, "records").filter(pl.col("unit").is_in(neurons_scored))
        stats = storage.read("neuron_records", layer_key, "stats")
        corpus = storage.read("corpus_tokens", columns=["seq_id", "tokens"])
        wanted = set(records["seq_id"].unique().to_list())
        corpus = corpus.filter(pl.col("seq_id").is_in(list(wanted)))
        tokens = dict(zip(corpus["seq_id"].to_list(), corpus["tokens"].to_list()))
        neurons = layer_neurons(scores, sims, records, stats, tokens)
        shown = sum(n["detail"] for n in neurons)
        note = (f"units: {layout.hookpoint(int(layer_key))}; {len(neurons)} scored from {len(present)}/{len(layout.shard_keys())} shards; records "
                f"for {shown}" + (f" (the best {MAX_SECTIONS} by score_all)" if shown < len(neurons) else ""))
        page = layer_page(layer_key, neurons, note=note)
        version = _write_page(viewer_page(storage.root, layer_key), page)
        return dg.MaterializeResult(
            data_version=dg.DataVersion(version),
            metadata={"pages written": 1, "units shown": shown, "units in the table": len(neurons),
                      "shards present": f"{len(present)}/{len(layout.shard_keys())}",
                      "page size (KB)": round(len(page.encode()) / 1024, 1),
                      "page": viewer_link(storage.root, layer_key)},
        )

    return neuron_viewer


def excerpt_windows(records: pl.DataFrame, explained: pl.DataFrame, n: int = EXCERPTS) -> list[int]:
    """The `n` windows where explained neurons fire most: by the sum, over the explained neurons
    that have the window among their top records, of the window's max / the neuron's max activation
    (records: layer, neuron, kind, seq_id, activations). Ties: lower seq_id first."""
    top = records.filter(pl.col("kind") == "top").join(
        explained.select("layer", "unit", "max_activation"), on=["layer", "unit"])
    if top.height == 0:
        return []
    window_max = pl.col("activations").list.max().cast(pl.Float64)
    max_activation = pl.when(pl.col("max_activation") > 0).then(pl.col("max_activation")).otherwise(1.0)
    ranked = (top.with_columns(relative=window_max / max_activation).group_by("seq_id").agg(pl.col("relative").sum())
              .sort(["relative", "seq_id"], descending=[True, False]))
    return ranked["seq_id"].head(n).to_list()


def explorer_excerpts(storage: TableStorage, layout: Layout, subject_model: SubjectModel,
                      explained: pl.DataFrame) -> list[dict]:
    """The `index_page` token explorer view of the `excerpt_windows` (one forward pass of the
    subject model over them)."""
    layers = sorted(explained["layer"].unique().to_list())
    tops = [storage.read("neuron_records", layout.layer_key(layer), "records")
            .filter(pl.col("kind") == "top").with_columns(layer=pl.lit(layer, dtype=pl.Int32))
            for layer in layers if storage.exists("neuron_records", layout.layer_key(layer), "records")]
    windows = excerpt_windows(pl.concat(tops, how="diagonal_relaxed"), explained) if tops else []
    if not windows:
        return []
    corpus = storage.read("corpus_tokens").filter(pl.col("seq_id").is_in(windows))
    by_seq = {r["seq_id"]: r for r in corpus.iter_rows(named=True)}
    acts = run_windows(subject_model, np.asarray([by_seq[s]["token_ids"] for s in windows], dtype=np.int64), layers)
    excerpts = []
    for i, seq_id in enumerate(windows):
        hits = top_explained({layer: a[i] for layer, a in acts.items()}, explained, TOP_PER_TOKEN)
        for token_hits in hits:
            for h in token_hits:
                h["layer"] = layout.layer_key(h["layer"])
        excerpts.append({"title": f"window {seq_id} (document {by_seq[seq_id]['doc_id']})",
                         "tokens": by_seq[seq_id]["tokens"], "hits": hits})
    return excerpts


def build_neuron_viewer_index(layout: Layout):
    @dg.asset(
        deps=["neuron_viewer", "model_summary", "scores", "neuron_records", "corpus_tokens"],
        code_version="2",  # 2: says units
        automation_condition=ON_SCORES_CHANGE,
        kinds={"html", "pytorch"},
        owners=OWNERS,
        group_name="viewer",
        description="The viewer's index page: a link to each layer page present, the quality report of "
        "model_summary, and the token explorer view (`neuron-assets explore`) of the 3 corpus windows where "
        "explained neurons fire most: per token, the most active explained neurons of each layer, with "
        "their explanation and score_all. Runs the subject model on those windows (one forward pass).",
    )
    def neuron_viewer_index(context: dg.AssetExecutionContext, storage: TableStorage,
                            subject_model: SubjectModel) -> dg.MaterializeResult:
        keys = [layout.layer_key(i) for i in layout.layers]

        def page_exists(key: str) -> bool:
            path = UPath(viewer_page(storage.root, key))
            with s3_errors(str(path), "look for"):
                return path.exists()

        pages = [k for k in keys if page_exists(k)]
        if not pages:
            raise FileNotFoundError("no neuron_viewer page exists yet: materialize neuron_viewer first")
        explained = load_explained(storage, keys, layout.shard_keys())
        counts = dict(explained.group_by("layer").len().iter_rows())
        quality = None
        if storage.exists("model_summary"):
            report = quality_report(storage.read("model_summary"))
            quality = (report.columns, [list(r) for r in report.iter_rows()])
        excerpts = explorer_excerpts(storage, layout, subject_model, explained)
        page = index_page([(k, counts.get(int(k), 0)) for k in pages], quality, excerpts,
                          note=f"subject model: {subject_model.label}")
        version = _write_page(viewer_page(storage.root), page)
        return dg.MaterializeResult(
            data_version=dg.DataVersion(version),
            metadata={"pages written": 1, "layer pages linked": len(pages),
                      "units shown": int(explained.height), "explorer excerpts": len(excerpts),
                      "page": viewer_link(storage.root)},
        )

    return neuron_viewer_index
