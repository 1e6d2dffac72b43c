"""Score plots (neuron_assets.plots) and what layer_summary / model_summary show in the Dagster UI:
the plots as images, the best and the worst neurons, the link to the viewer."""

import base64
import io
import math
import re

import matplotlib.image
import polars as pl
import pytest
from dagster import AssetKey, MetadataValue
from pipeline import in_memory_instance, tiny_settings
from tiny_models import build_tiny_model

from neuron_assets.assets.common import viewer_page
from neuron_assets.assets.scores import viewer_link
from neuron_assets.runs import materialize_runs, shard_keys
from neuron_assets.definitions import build_definitions
from neuron_assets.plots import (
    finite_scores,
    score_by_layer,
    score_by_layer_figure,
    score_histogram,
    score_histogram_figure,
)
from neuron_assets.resources.storage import TableStorage
from neuron_assets.stages.score import SCHEMA

PNG = b"\x89PNG\r\n\x1a\n"
NAN = float("nan")


def size(png: bytes) -> tuple[int, int]:
    assert png[:8] == PNG
    height, width, _ = matplotlib.image.imread(io.BytesIO(png), format="png").shape
    return width, height


def test_histogram_is_a_small_png_that_depends_on_the_scores():
    first = score_histogram({"llm": [0.1, 0.5, 0.9], "token_baseline": [-0.2, 0.3]})
    assert size(first) == (480, 240)  # 6 x 3 inches at 80 dpi
    assert len(first) < 60_000
    assert score_histogram({"llm": [0.1, 0.5, 0.9], "token_baseline": [-0.2, 0.3]}) == first  # deterministic
    assert score_histogram({"llm": [0.1, 0.5, 0.8], "token_baseline": [-0.2, 0.3]}) != first
    assert score_histogram({"llm": [0.1, 0.5, 0.9]}) != first


def test_histogram_leaves_out_nan_scores_and_counts_them():
    assert finite_scores([0.5, NAN, None, -0.25, NAN]) == ([0.5, -0.25], 3)
    figure = score_histogram_figure({"llm": [0.5, NAN, 0.7, None], "token_baseline": [NAN, 0.1]})
    (ax,) = figure.axes
    assert ax.get_title() == "score_all: 3 scores, 3 NaN excluded"
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["llm (n=2)", "token_baseline (n=1)"]
    # only NaN: an image that says so, not an error
    empty = score_histogram_figure({"llm": [NAN, NAN]})
    assert empty.axes[0].get_title() == "score_all: 0 scores, 2 NaN excluded"
    assert size(score_histogram({"llm": [NAN, NAN]})) == (480, 240)


def test_score_by_layer_draws_the_shuffled_control_dashed():
    summary = pl.DataFrame({"layer": [0, 1, 0, 1], "series": ["llm", "llm", "token_baseline", "token_baseline"],
                            "mean_score_all": [0.3, 0.4, 0.1, 0.2], "control_mean_score_all": [0.0, 0.05, None, None]})
    (ax,) = score_by_layer_figure(summary).axes
    styles = {line.get_label(): line.get_linestyle() for line in ax.get_lines() if not line.get_label().startswith("_")}
    assert styles == {"llm": "-", "llm shuffled": "--", "token_baseline": "-"}  # no control: no dashed line
    dashed = next(line for line in ax.get_lines() if line.get_label() == "llm shuffled")
    assert list(dashed.get_xdata()) == [0, 1] and list(dashed.get_ydata()) == [0.0, 0.05]
    png = score_by_layer(summary)
    assert size(png) == (480, 240)
    assert score_by_layer(summary.with_columns(mean_score_all=pl.col("mean_score_all") + 0.2)) != png


def test_viewer_link_is_a_path_locally_and_a_url_on_s3(tmp_path):
    local = viewer_link(str(tmp_path), "03")
    assert isinstance(local, type(MetadataValue.path("x"))) and local.path == viewer_page(str(tmp_path), "03")
    remote = viewer_link("s3://bucket/study")
    assert isinstance(remote, type(MetadataValue.url("x")))
    assert remote.url == "s3://bucket/study/neuron_viewer/index.html"


# --- layer_summary and model_summary on hand-written scores tables ---------------------------------

# (neuron, variant, score_all) per layer and shard; the controls score best and worst, to show they
# are left out of the tables and the histogram; NaN is a constant simulation.
SCORES = {
    0: [[(0, "llm", 0.62), (0, "token_baseline", 0.11), (0, "llm_shuffled", 0.99),
         (1, "llm", NAN), (1, "token_baseline", -0.31), (1, "llm_shuffled", -0.97)],
        [(32, "llm", 0.87), (32, "token_baseline", 0.40), (32, "llm_shuffled", 0.02),
         (33, "llm", -0.12), (33, "token_baseline", NAN), (33, "llm_shuffled", 0.05)]],
    1: [[(0, "llm", 0.21), (0, "token_baseline", 0.30), (0, "llm_shuffled", -0.05),
         (1, "llm", 0.95), (1, "token_baseline", 0.15), (1, "llm_shuffled", 0.10)],
        [(32, "llm", -0.44), (32, "token_baseline", 0.05), (32, "llm_shuffled", 0.98),
         (33, "llm", 0.33), (33, "token_baseline", -0.02), (33, "llm_shuffled", -0.99)]],
}


def scores_table(layer: int, rows) -> pl.DataFrame:
    out = []
    for neuron, variant, score in rows:
        out.append({"layer": layer, "unit": neuron, "variant": variant,
                    "explanation": f"layer {layer} neuron {neuron} by {variant}", "score_all": score,
                    "score_top": score, "score_random": score, "rsquared": score, "abs_dev_explained": score,
                    "n_failed_tokens": 0, "cost_usd": 0.001, "simulator_model": "tiny", "method": "all_at_once",
                    "explanation_id": f"{layer}-{neuron}-{variant}", "records_hash": "0" * 16,
                    "donor_unit": 1 - neuron % 2 if variant.endswith("_shuffled") else None, "error": None})
    return pl.DataFrame(out, schema=SCHEMA)


@pytest.fixture(scope="module")
def summaries(tmp_path_factory):
    """layer_summary (both layers) and model_summary materialized through Dagster on the tables above."""
    tmp = tmp_path_factory.mktemp("plots")
    settings = tiny_settings(build_tiny_model("gpt2", tmp / "model", n_layers=2), tmp)
    defs = build_definitions(settings)
    storage = TableStorage(root=settings.storage)
    shards = shard_keys(defs)
    assert len(shards) == 2
    for layer, by_shard in SCORES.items():
        for shard, rows in zip(shards, by_shard):
            storage.write(scores_table(layer, rows), "scores", f"{layer:02d}|{shard}")
        # the layer summary also reads which units are dead: neuron 5 of every layer
        storage.write(pl.DataFrame({"unit": range(8), "activation_frequency": [0.5] * 5 + [0.0] + [0.5] * 2}),
                      "neuron_records", f"{layer:02d}", "stats")
    with in_memory_instance() as instance:
        materialize_runs(defs, instance, [(("layer_summary",), "00"), (("layer_summary",), "01"),
                                          (("model_summary",), None)], log=lambda _: None)
        layers = {r.partition_key: r.asset_materialization.metadata
                  for r in instance.fetch_materializations(AssetKey("layer_summary"), limit=10).records}
        (model,) = [r.asset_materialization.metadata
                    for r in instance.fetch_materializations(AssetKey("model_summary"), limit=10).records]
    return settings, layers, model


def image(metadata, name: str) -> bytes:
    match = re.fullmatch(rf"!\[{name}\]\(data:image/png;base64,([A-Za-z0-9+/=]+)\)", metadata[name].value)
    assert match, metadata[name].value[:100]
    return base64.b64decode(match[1])


def table(metadata, name: str) -> list[dict]:
    header, _, *rows = metadata[name].value.strip().splitlines()
    columns = [c.strip() for c in header.strip("|").split("|")]
    return [dict(zip(columns, (c.strip() for c in row.strip("|").split("|")))) for row in rows]


def real(layers) -> list[tuple]:
    """(layer, neuron, variant, score_all) of the real variants with a finite score."""
    return [(layer, n, v, s) for layer in layers for shard in SCORES[layer] for n, v, s in shard
            if not v.endswith("_shuffled") and not math.isnan(s)]


def by_variant(layers) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {}
    for layer in layers:
        for shard in SCORES[layer]:
            for _, variant, score in shard:
                if not variant.endswith("_shuffled"):
                    out.setdefault(variant, []).append(score)
    return dict(sorted(out.items()))


def test_layer_summary_shows_the_histogram_of_real_variants(summaries):
    _, layers, _ = summaries
    assert set(layers) == {"00", "01"}
    histogram = image(layers["00"], "score histogram")
    assert size(histogram) == (480, 240)
    # exactly the plot of the real variants' scores, NaNs included to be counted; no control
    assert histogram == score_histogram(by_variant([0]))
    assert histogram != score_histogram({**by_variant([0]), "llm_shuffled": [0.99, -0.97, 0.02, 0.05]})
    assert image(layers["01"], "score histogram") == score_histogram(by_variant([1])) != histogram
    assert (layers["00"]["dead units (not explained)"].value, layers["00"]["rare units (not explained)"].value) == (
        "1: 5", "0")


def test_layer_summary_lists_the_best_and_the_worst_neurons(summaries):
    _, layers, _ = summaries
    for key, layer in (("00", 0), ("01", 1)):
        expected = sorted(real([layer]), key=lambda r: -r[3])
        best, worst = table(layers[key], "best neurons"), table(layers[key], "worst neurons")
        assert list(best[0]) == ["unit", "variant", "score_all", "explanation"]
        assert [(int(r["unit"]), r["variant"], float(r["score_all"])) for r in best] == \
            [(n, v, s) for _, n, v, s in expected]
        assert [(int(r["unit"]), r["variant"], float(r["score_all"])) for r in worst] == \
            [(n, v, s) for _, n, v, s in expected[::-1]]
        assert best[0]["explanation"] == f"layer {layer} neuron {expected[0][1]} by {expected[0][2]}"
    assert float(table(layers["00"], "best neurons")[0]["score_all"]) == 0.87  # not the control's 0.99
    assert float(table(layers["00"], "worst neurons")[0]["score_all"]) == -0.31  # not the control's -0.97


def test_layer_summary_links_its_viewer_page(summaries):
    settings, layers, _ = summaries
    assert layers["00"]["viewer"].path == viewer_page(settings.storage, "00")
    assert layers["01"]["viewer"].path == viewer_page(settings.storage, "01")


def test_model_summary_shows_plots_tables_and_viewer(summaries):
    settings, _, model = summaries
    assert image(model, "score histogram") == score_histogram(by_variant([0, 1]))

    def mean(values):
        finite = [v for v in values if not math.isnan(v)]
        return sum(finite) / len(finite)

    rows = []
    for layer in (0, 1):
        scores = [row for shard in SCORES[layer] for row in shard]
        control = mean([s for _, v, s in scores if v == "llm_shuffled"])
        for variant in ("llm", "token_baseline"):
            rows.append({"layer": layer, "series": variant,
                         "mean_score_all": mean([s for _, v, s in scores if v == variant]),
                         "control_mean_score_all": control if variant == "llm" else None})
    by_layer = image(model, "score by layer")
    assert size(by_layer) == (480, 240)
    assert by_layer == score_by_layer(pl.DataFrame(rows))

    expected = sorted(real([0, 1]), key=lambda r: (-r[3], r[0]))[:10]
    best = table(model, "best neurons")
    assert list(best[0]) == ["layer", "unit", "variant", "score_all", "explanation"]
    assert [(int(r["layer"]), int(r["unit"]), r["variant"], float(r["score_all"])) for r in best] == expected
    worst = table(model, "worst neurons")
    assert [(int(r["layer"]), int(r["unit"]), r["variant"], float(r["score_all"])) for r in worst] == \
        sorted(real([0, 1]), key=lambda r: (r[3], r[0]))[:10]
    assert model["viewer"].path == viewer_page(settings.storage)
