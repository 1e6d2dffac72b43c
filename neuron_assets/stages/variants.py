"""The explanation variants of a shard that are simulated and scored: every explanation table's
rows, and each variant's shuffled control (docs/method.md, Controls)."""

import hashlib
import zlib

import polars as pl

from neuron_assets.method.controls import SUFFIX, control_of, donors
from neuron_assets.stages.explain import SCHEMA

# rows of a shuffled control (variant `<variant>_shuffled`), as a polars filter
CONTROL_ROWS = pl.col("variant").str.ends_with(SUFFIX)
TOO_FEW = "a shuffled control needs at least 2 neurons of the shard explained by this variant"


def explanation_variants(tables: list[pl.DataFrame], partition_key: str, seed: int, control: bool) -> pl.DataFrame:
    """The rows of the explanation `tables` (explanations, revised_explanations, imported_explanations)
    with a `donor_unit` column, and with `control` each variant's shuffled control: every neuron
    explained by that variant gets the explanation of another such neuron of the shard
    (`donor_unit`; a seeded derangement per partition and variant), at no explainer cost."""
    own = pl.concat(tables, how="diagonal_relaxed").select(*SCHEMA).with_columns(donor_unit=pl.lit(None, pl.Int32))
    if not control:
        return own
    controls = []
    for (variant,), rows in own.filter(pl.col("error").is_null()).group_by("variant", maintain_order=True):
        rows = rows.sort("unit")
        if rows.height < 2:
            controls.append(rows.with_columns(variant=pl.lit(control_of(variant)), text=pl.lit(None, pl.String),
                                              error=pl.lit(TOO_FEW), cost_usd=0.0, tokens_in=0, tokens_out=0))
            continue
        donor = rows[donors(rows.height, zlib.crc32(f"{seed}|{partition_key}|{variant}".encode()))]
        ids = [hashlib.sha256(f"{control_of(variant)}|{n}|{d}".encode()).hexdigest()[:16]
               for n, d in zip(rows["unit"], donor["explanation_id"])]
        controls.append(donor.with_columns(
            unit=rows["unit"], variant=pl.lit(control_of(variant)), explanation_id=pl.Series(ids),
            donor_unit=donor["unit"], tokens_in=0, tokens_out=0, cost_usd=0.0, cache_hit=False))
    return pl.concat([own, *controls], how="diagonal_relaxed").sort("unit", "variant")
