"""Small helpers shared by the asset modules: partition keys, record lookup, progress, metadata."""


import numpy as np
import polars as pl
from dagster import MetadataValue

from neuron_assets.stages.timing import log_reporter

OWNERS = ["team:interpretability"]
LAYER = "layer"

# Metadata keys that other code reads back (the audit, benchmarks, tests): written and read by name.
PATH = "path"
CONTENT_HASH = "content hash"  # a partition of several tables: their hashes, concatenated
COST = "cost_usd"
REUSED = "reused (unchanged inputs)"
CACHE_HITS, CACHE_MISSES = "LLM cache hits", "LLM cache misses"
MODEL_SECONDS = "model seconds"


def layer_and_shard(context) -> tuple[str, str]:
    keys = context.partition_key.keys_by_dimension
    return keys["layer"], keys["shard"]


def previous_rows(storage, asset: str, partition: str) -> pl.DataFrame | None:
    """This partition's table from its last materialization, for reusing unchanged neurons."""
    return storage.read(asset, partition) if storage.exists(asset, partition) else None


def progress_log(context):
    """A stage's progress reporter: run log lines that carry their state for the console's bar."""
    return log_reporter(context.log.info)


def llm_metadata(df: pl.DataFrame, seconds: float, model_seconds: float) -> dict:
    """What a table of LLM work cost (its tokens_in, tokens_out and cost_usd columns) and took."""
    return {"tokens in": int(df["tokens_in"].sum()), "tokens out": int(df["tokens_out"].sum()),
            COST: float(df["cost_usd"].sum()), "seconds": round(seconds, 1), MODEL_SECONDS: round(model_seconds, 1)}


def percentiles(values, name: str) -> dict:
    """Metadata entries for the 10/50/90th percentiles and mean of the finite values."""
    finite = np.asarray([v for v in values if v is not None and np.isfinite(v)], dtype=np.float64)
    if finite.size == 0:
        return {}
    p10, p50, p90 = np.percentile(finite, [10, 50, 90])
    return {f"{name} mean": float(finite.mean()), f"{name} p10": float(p10),
            f"{name} median": float(p50), f"{name} p90": float(p90)}


def markdown_table(df: pl.DataFrame, digits: int = 3) -> MetadataValue:
    if df.height == 0:
        return MetadataValue.md("_no rows_")
    header = "| " + " | ".join(df.columns) + " |\n|" + "---|" * len(df.columns) + "\n"

    def cell(v):
        if isinstance(v, float):
            return "NaN" if not np.isfinite(v) else f"{v:.{digits}f}"
        return str(v).replace("|", "\\|").replace("\n", " ") if v is not None else ""

    body = "".join("| " + " | ".join(cell(v) for v in row) + " |\n" for row in df.iter_rows())
    return MetadataValue.md(header + body)


def viewer_page(root: str, layer: str | None = None) -> str:
    """Where the neuron viewer writes a layer's page (or, without a layer, the index of all layers)."""
    return f"{root.rstrip('/')}/neuron_viewer/{layer}/index.html" if layer else f"{root.rstrip('/')}/neuron_viewer/index.html"
