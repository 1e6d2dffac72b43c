"""Controls, revision, detection and fuzzing, interchange and the quality report, end to end: a
subject model whose layer-0 neurons fire on known words (built into its weights) and a rule-based
LLM that follows explanations faithfully, behind a real OpenAI-compatible server on loopback."""

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from oracle_server import OracleServer
from pipeline import in_memory_instance, remote, run_graph, tiny_settings
from tiny_models import build_token_neuron_model

from neuron_assets.cli import score_table
from neuron_assets.runs import materialize_runs
from neuron_assets.definitions import build_definitions
from neuron_assets.method.interchange import read_explanations
from neuron_assets.resources.storage import TableStorage

# neuron 0 fires on "the", neuron 1 on "is", neuron 2 fully on "to" and half as strongly on "the"
WORDS = [" the", " is", " to| the"]
SHARD = "00|00-63"


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("quality")
    model, _ = build_token_neuron_model(tmp / "model", WORDS, n_layers=1)
    with OracleServer() as server:
        settings = replace(remote(tiny_settings(model, tmp, neurons="first:3", shards=1), server),
                           simulation_method="json", revision="on", control="shuffled", detection="on",
                           embedding="on")
        with in_memory_instance() as instance:
            storage = run_graph(settings, instance, ("00",))
            yield settings, storage, instance


def by_variant(storage: TableStorage, asset: str, column: str) -> dict[tuple[int, str], object]:
    table = storage.read(asset, SHARD)
    return {(n, v): x for n, v, x in table.select("unit", "variant", column).iter_rows()}


def test_right_explanations_score_far_above_their_shuffled_control(study):
    _, storage, _ = study
    score = by_variant(storage, "scores", "score_all")
    for neuron in (0, 1, 2):
        assert score[(neuron, "token_baseline")] > 0.9, neuron
    for neuron in (0, 1):
        assert score[(neuron, "llm")] > 0.9, neuron
    scores = storage.read("scores", SHARD)
    controls = scores.filter(pl.col("variant").str.ends_with("_shuffled"))
    assert controls.height == 9 and controls["error"].is_null().all()
    assert (controls["donor_unit"] != controls["unit"]).all()  # nobody keeps its own explanation
    summary = storage.read("layer_summary", "00")
    for variant in ("llm", "token_baseline", "revised"):
        row = summary.filter(pl.col("variant") == variant).row(0, named=True)
        assert row["mean_score_all"] > 0.9 and row["margin_over_control"] > 0.5, row
        assert row["control_mean_score_all"] == pytest.approx(
            controls.filter(pl.col("variant") == f"{variant}_shuffled")["score_all"].mean())


def test_revision_shows_misses_and_the_revised_explanation_scores_higher(study):
    _, storage, _ = study
    revised = storage.read("revised_explanations", SHARD).sort("unit")
    first = storage.read("explanations", SHARD).filter(pl.col("variant") == "llm").sort("unit")
    assert revised["revised_from"].to_list() == first["explanation_id"].to_list()
    two_words = revised.row(2, named=True)
    assert first["text"][2] == 'the token "to"'  # the first explanation misses the weaker word
    assert two_words["misses"] >= 1 and '"the"' in two_words["text"] and '"to"' in two_words["text"]
    score = by_variant(storage, "scores", "score_all")
    assert score[(2, "revised")] > score[(2, "llm")] + 0.05
    for neuron in (0, 1):  # nothing to fix: the first explanation stands, at no explainer cost
        row = revised.row(neuron, named=True)
        assert row["text"] == first["text"][neuron] and row["misses"] == row["false_alarms"] == 0
    gain = storage.read("layer_summary", "00").filter(pl.col("variant") == "revised")["gain_over_llm"][0]
    assert gain == pytest.approx(np.mean([score[(n, "revised")] - score[(n, "llm")] for n in (0, 1, 2)]))
    assert gain > 0.02


def test_detection_and_fuzzing_are_high_with_random_negatives(study):
    _, storage, _ = study
    judged = storage.read("detection_scores", SHARD)
    assert not judged["variant"].str.ends_with("_shuffled").any()  # controls are not judged
    assert judged["error"].is_null().all() and (judged["n_unanswered"] == 0).all()
    for row in judged.filter(pl.col("unit") < 2).iter_rows(named=True):
        assert row["detection_random"] >= 0.9 and row["fuzzing_random"] >= 0.9, row
        assert row["n_positive"] == 10 and row["n_random"] >= 3
    # these neurons fire on their word wherever it appears: no window is a hard negative, and the
    # hard-negative accuracy is NaN (not 0)
    records = storage.read("neuron_records", "00", "records")
    assert records.filter((pl.col("kind") == "hard_negative") & (pl.col("unit") < 3)).height == 0
    assert judged["detection_hard_negative"].is_nan().all() and (judged["n_hard_negative"] == 0).all()
    summary = storage.read("layer_summary", "00").filter(pl.col("variant") == "llm").row(0, named=True)
    assert summary["mean_detection_random"] >= 0.9 and np.isnan(summary["mean_detection_hard_negative"])


def test_embedding_scores_every_variant_and_its_control(study):
    _, storage, _ = study
    embedded = storage.read("embedding_scores", SHARD)
    # 3 neurons x (llm, revised, token_baseline), each with its shuffled control
    assert embedded.height == 18 and embedded["error"].is_null().all()
    assert embedded.filter(pl.col("variant").str.ends_with("_shuffled"))["donor_unit"].is_not_null().all()
    assert ((embedded["auroc"] >= 0) & (embedded["auroc"] <= 1)).all() and (embedded["n_positive"] == 10).all()
    assert embedded["auroc_hard_negative"].is_nan().all()  # no hard negatives (above): NaN, not 0
    summary = storage.read("layer_summary", "00")
    for variant in ("llm", "revised", "token_baseline"):
        row = summary.filter(pl.col("variant") == variant).row(0, named=True)
        assert row["mean_embedding_auroc"] == pytest.approx(
            embedded.filter(pl.col("variant") == variant)["auroc"].mean())
        assert row["control_mean_embedding_auroc"] == pytest.approx(
            embedded.filter(pl.col("variant") == f"{variant}_shuffled")["auroc"].mean())


def test_quality_report_lists_layers_by_variants(study):
    settings, _, _ = study
    lines = score_table(settings.storage).splitlines()
    assert lines[0].split()[:9] == ["layer", "variant", "method", "units", "errors", "mean", ">=0.8", "control",
                                    "margin"]
    assert lines[0].split()[-4:] == ["emb", "emb.ctl", "cost", "$"]
    assert [line.split()[1] for line in lines[1:]] == ["llm", "revised", "token_baseline"]
    assert all(line.split()[2] == "json" and line.split()[3:5] == ["3", "0"] for line in lines[1:])


def test_export_import_score_round_trip_reproduces_the_scores(study, tmp_path):
    settings, storage, instance = study
    exported = Path(settings.storage) / "exported_neurons"
    llm = storage.read("scores", SHARD).filter(pl.col("variant") == "llm").sort("unit")
    for neuron, text, score in llm.select("unit", "explanation", "score_all").iter_rows():
        path = exported / "explanations" / "0" / f"{neuron}.jsonl"
        first = read_explanations(path.read_text(), str(path))[0]
        assert (first["explanation"], first["score"]) == (text, pytest.approx(score, abs=1e-12))
        obj = json.loads(path.read_text())
        assert [e["explanation"].strip() for e in obj["scored_explanations"]][:2] == [text, storage.read(
            "revised_explanations", SHARD)["text"][neuron]]
    # a file that is not JSON is that neuron's error row; the others are imported
    folder = tmp_path / "published"
    for kind in ("explanations", "collated-activations"):
        for file in (exported / kind / "0").iterdir():
            (folder / kind / "0").mkdir(parents=True, exist_ok=True)
            (folder / kind / "0" / file.name).write_bytes(file.read_bytes())
    (folder / "explanations" / "0" / "1.jsonl").write_text("{not json")
    imported = replace(settings, import_from=str(folder))
    defs = build_definitions(imported)
    materialize_runs(defs, instance, [(("imported_explanations", "simulations", "scores"), SHARD)], log=lambda _: None)
    scores = storage.read("scores", SHARD)
    mine = scores.filter(pl.col("variant") == "imported").sort("unit")
    assert mine["unit"].to_list() == [0, 1, 2]
    assert mine["score_all"][0] == llm["score_all"][0] and mine["score_all"][2] == llm["score_all"][2]
    assert mine["explanation"][0] == llm["explanation"][0]
    assert "1.jsonl: line 1 is not JSON" in mine["error"][1] and np.isnan(mine["score_all"][1])
    # the two neurons imported are each other's control
    control = scores.filter(pl.col("variant") == "imported_shuffled").sort("unit")
    assert control["unit"].to_list() == [0, 2] and control["donor_unit"].to_list() == [2, 0]


def test_import_from_s3(study, s3, tmp_path):
    settings, storage, instance = study
    exported = Path(settings.storage) / "exported_neurons" / "explanations" / "0"
    for neuron in (0, 2):
        s3.put(str(exported / f"{neuron}.jsonl"), f"study/published/explanations/0/{neuron}.jsonl")
    imported = replace(settings, import_from="s3://study/published", storage=str(tmp_path / "data"))
    defs = build_definitions(imported)
    materialize_runs(defs, instance, [(("imported_explanations",), SHARD)], log=lambda _: None)
    rows = TableStorage(root=imported.storage).read("imported_explanations", SHARD).sort("unit")
    llm = storage.read("explanations", SHARD).filter(pl.col("variant") == "llm").sort("unit")
    assert rows["text"][0] == llm["text"][0] and rows["text"][2] == llm["text"][2]
    assert "no file s3://study/published/explanations/0/1.jsonl" in rows["error"][1]
