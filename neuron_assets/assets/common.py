"""Small helpers shared by the asset modules: partition keys, record lookup, progress, metadata."""


import numpy as np
import polars as pl
from dagster import MetadataValue

from neuron_assets.method.controls import SUFFIX

OWNERS = ["team:interpretability"]
# rows of a shuffled control (variant `<variant>_shuffled`), as a polars filter
CONTROL_ROWS = pl.col("variant").str.ends_with(SUFFIX)
LAYER = "layer"


def layer_and_shard(context) -> tuple[str, str]:
    keys = context.partition_key.keys_by_dimension
    return keys["layer"], keys["shard"]


def previous_rows(storage, asset: str, partition: str) -> pl.DataFrame | None:
    """This partition's table from its last materialization, for reusing unchanged neurons."""
    return storage.read(asset, partition) if storage.exists(asset, partition) else None


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
