"""Asset checks: plain functions over a partition's table, returning AssetCheckResult fields."""

import math

import polars as pl


def no_silent_zero_simulations(simulations: pl.DataFrame) -> dict:
    """Rows without an error must hold finite values that are not all exactly zero.

    An all-zero simulation is what a silently swallowed failure looks like; a real expected
    value is a probability-weighted mean and practically never exactly 0 at every token.
    """
    ok = simulations.filter(pl.col("error").is_null())
    silent = [
        (n, v, s) for n, v, s, values in ok.select("unit", "variant", "seq_id", "expected").iter_rows()
        if values is None or not all(math.isfinite(x) for x in values) or not any(values)
    ]
    return {"passed": not silent,
            "metadata": {"rows checked": ok.height, "silent zero or NaN rows": len(silent),
                         "first offenders": str(silent[:5])}}


SCORE_COLUMNS = ("score_all", "score_top", "score_random")


def scores_in_range(scores: pl.DataFrame) -> dict:
    """Every score is in [-1, 1] or NaN (constant simulation or failures), and NaNs are counted."""
    metadata, out_of_range = {}, 0
    for column in SCORE_COLUMNS:
        values = scores[column].fill_null(float("nan"))
        metadata[f"NaN {column}"] = int(values.is_nan().sum())
        # polars orders NaN above every number, so test NaN explicitly rather than compare
        out_of_range += int((~values.is_nan() & ~values.is_between(-1 - 1e-6, 1 + 1e-6)).sum())
    metadata["scores out of [-1, 1]"] = out_of_range
    return {"passed": out_of_range == 0, "metadata": metadata}
