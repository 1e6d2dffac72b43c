"""Small PNG plots of the scores for the Dagster UI's metadata: plain data in, PNG bytes out.

Matplotlib through its Agg canvas on a `Figure` of its own (never pyplot's global state), so plots
can be drawn from any thread of a run. Figures are ~6x3 inches at 80 dpi: a few tens of KB, small
enough to sit in an asset's metadata as a base64 data URI (`png_markdown`).
"""

import base64
import io
import math
from collections.abc import Mapping, Sequence

import polars as pl
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

SIZE = (6.0, 3.0)
DPI = 80
BINS = [i / 20 for i in range(-20, 21)]  # score_all lies in [-1, 1]: 0.05 wide bins, comparable across plots


def finite_scores(scores: Sequence[float | None]) -> tuple[list[float], int]:
    """The finite scores and how many were NaN (or missing): a NaN score is a constant simulation."""
    finite = [float(s) for s in scores if s is not None and math.isfinite(s)]
    return finite, len(scores) - len(finite)


def to_png(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    FigureCanvasAgg(figure).print_png(buffer)
    return buffer.getvalue()


def png_markdown(png: bytes, alt: str) -> str:
    """Markdown that Dagster's UI renders as the image."""
    return f"![{alt}](data:image/png;base64,{base64.b64encode(png).decode('ascii')})"


def score_histogram_figure(scores: Mapping[str, Sequence[float | None]], title: str = "score_all") -> Figure:
    """One step histogram per series (e.g. explanation variant) of the finite scores; the title
    counts the neurons plotted and the NaN scores left out."""
    figure = Figure(figsize=SIZE, dpi=DPI, layout="constrained")
    ax = figure.add_subplot()
    plotted = excluded = 0
    for name, values in scores.items():
        finite, nan = finite_scores(values)
        plotted, excluded = plotted + len(finite), excluded + nan
        if finite:
            ax.hist(finite, bins=BINS, histtype="step", linewidth=1.5, label=f"{name} (n={len(finite)})")
    if plotted == 0:
        ax.text(0.5, 0.5, "no finite scores", ha="center", va="center", transform=ax.transAxes)
    else:
        ax.legend(fontsize="small")
    ax.set_xlim(-1, 1)
    ax.set_xlabel("score_all")
    ax.set_ylabel("units")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(f"{title}: {plotted} scores, {excluded} NaN excluded", fontsize="medium")
    return figure


def score_histogram(scores: Mapping[str, Sequence[float | None]], title: str = "score_all") -> bytes:
    return to_png(score_histogram_figure(scores, title))


def score_by_layer_figure(summary: pl.DataFrame) -> Figure:
    """Mean score_all per layer, one solid line per series, and its shuffled control dashed, in the
    same colour, where there is one.

    `summary`: columns layer (int), series (str), mean_score_all and optionally
    control_mean_score_all (null or NaN where there is no control)."""
    figure = Figure(figsize=SIZE, dpi=DPI, layout="constrained")
    ax = figure.add_subplot()
    has_control = "control_mean_score_all" in summary.columns
    for (series,), rows in summary.sort("series", "layer").group_by("series", maintain_order=True):
        layers = rows["layer"].to_list()
        (line,) = ax.plot(layers, _nan_for_null(rows["mean_score_all"]), marker="o", label=series)
        if has_control:
            control = _nan_for_null(rows["control_mean_score_all"])
            if any(math.isfinite(v) for v in control):
                ax.plot(layers, control, linestyle="--", marker=".", color=line.get_color(),
                        label=f"{series} shuffled")
    if summary.height:
        ax.legend(fontsize="small")
        ax.set_xticks(sorted(set(summary["layer"].to_list())))
    else:
        ax.text(0.5, 0.5, "no layers", ha="center", va="center", transform=ax.transAxes)
    ax.axhline(0.0, color="grey", linewidth=0.5)
    ax.set_xlabel("layer")
    ax.set_ylabel("mean score_all")
    ax.set_title("mean score_all by layer (dashed: shuffled control)", fontsize="medium")
    return figure


def score_by_layer(summary: pl.DataFrame) -> bytes:
    return to_png(score_by_layer_figure(summary))


def _nan_for_null(values: pl.Series) -> list[float]:
    return [float("nan") if v is None else float(v) for v in values.to_list()]
