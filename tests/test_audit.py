"""`neuron-assets audit`: the lineage of one neuron's score, on a tiny 1-layer GPT-2 graph.

The tests share one materialization; the tests that add events to the instance come last.
"""

import shutil
from types import SimpleNamespace

import polars as pl
import pytest
from dagster import AssetKey, AssetMaterialization, AssetObservation, AssetRecordsFilter, instance_for_test
from pipeline import run_graph, tiny_settings
from tiny_models import build_tiny_model

from neuron_assets.audit import AuditError, audit, format_audit, locate, main_audit
from neuron_assets.cli import materialize_runs
from neuron_assets.definitions import build_definitions
from neuron_assets.resources.storage import TableStorage

SHARD, OTHER_SHARD = "00-31", "32-63"  # 64 neurons in 2 shards; first:2 neurons of the first shard are run
PARTITION = f"00|{SHARD}"
NEURON = 1


@pytest.fixture(scope="module")
def graph(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("audit")
    model = build_tiny_model("gpt2", tmp / "model", n_layers=1, max_positions=4096)
    settings = tiny_settings(model, tmp)
    with instance_for_test() as instance:
        storage = run_graph(settings, instance, ("00",), shards=[SHARD])
        yield settings, storage, instance


def latest(instance, asset, partition=None):
    records = instance.fetch_materializations(AssetKey(asset), limit=100).records
    return next(r for r in records if r.partition_key == partition)


def checks_of(result, status=None):
    return {(c["check"], c["variant"]): c["status"] for c in result["checks"]
            if status is None or c["status"] == status}


def test_audit_names_the_runs_and_versions_that_produced_each_partition(graph, capsys):
    settings, storage, instance = graph
    result = main_audit(SimpleNamespace(layer=0, neuron=NEURON), settings=settings, instance=instance)
    printed = capsys.readouterr().out
    assert result["partition"] == PARTITION and result["shard"] == SHARD
    for section, asset, partition in (("scores", "scores", PARTITION), ("simulations", "simulations", PARTITION),
                                      ("explanations", "explanations", PARTITION),
                                      ("neuron_records", "neuron_records", "00"),
                                      ("corpus_tokens", "corpus_tokens", None)):
        record = latest(instance, asset, partition)
        m = result[section]["materialization"]
        tags = record.asset_materialization.tags
        assert m["run_id"] == record.run_id and m["timestamp"] == record.timestamp
        assert m["data_version"] == tags["dagster/data_version"] and m["code_version"] == tags["dagster/code_version"]
        assert record.run_id in printed and tags["dagster/data_version"] in printed
    # the score, simulation and explanation steps share one run; the records and tokens have their own
    runs = {s: result[s]["materialization"]["run_id"] for s in ("scores", "explanations", "neuron_records",
                                                                   "corpus_tokens")}
    assert runs["scores"] == runs["explanations"] and len(set(runs.values())) == 3

    scores = storage.read("scores", PARTITION).filter(pl.col("neuron") == NEURON).sort("variant")
    assert [r["variant"] for r in result["scores"]["rows"]] == ["llm", "token_baseline"]
    for row, stored in zip(result["scores"]["rows"], scores.iter_rows(named=True)):
        assert row["score_all"] == pytest.approx(stored["score_all"], nan_ok=True)
        assert row["explanation_id"] == stored["explanation_id"] and row["method"] == stored["method"]
    sims = {s["variant"]: s for s in result["simulations"]["variants"]}
    assert sims["llm"]["sequences"] == 10 and sims["llm"]["failed_tokens"] == 0
    assert sims["llm"]["simulator_model"] == settings.simulator_model
    explanation = {e["variant"]: e for e in result["explanations"]["variants"]}["llm"]
    assert explanation["explainer_model"] == settings.explainer_model and explanation["cache_hit"] is False
    assert repr(explanation["text"]) in printed and explanation["prompt_version"] in printed

    records = latest(instance, "neuron_records", "00").asset_materialization
    assert result["neuron_records"]["content_hash"] == records.metadata["content hash"].value
    assert result["neuron_records"]["content_hash"] in printed
    assert result["corpus_tokens"]["version_used_by_neuron_records"] == result["corpus_tokens"]["data_version"]
    weights = result["subject_model_weights"]  # observed before the records (the first run of run_graph)
    assert len(weights["data_version"]) == 16 and weights["version_used_by_neuron_records"] == weights["data_version"]
    assert "subject_model_weights[00]: observation in run" in printed
    assert result["scores"]["column_lineage"]["explanation"] == ["explanations.text"]
    assert set(result["scores"]["column_lineage"]["score_all"]) == {"simulations.expected",
                                                                   "neuron_records.activations"}

    for asset in ("explanations", "simulations", "scores"):
        schema = latest(instance, asset, PARTITION).asset_materialization.metadata["dagster/column_schema"].value
        assert [c.name for c in schema.columns] == storage.read(asset, PARTITION).columns

    assert result["ok"] and not checks_of(result, "MISMATCH"), format_audit(result)
    statuses = checks_of(result)
    for check in ("score_explanation_id", "simulation_explanation_id", "score_records_hash",
                  "prompt_version_matches_code_version", "explanation_records_hash",
                  "simulated_sequences_are_valid_split"):
        assert statuses[(check, "llm")] == statuses[(check, "token_baseline")] == "ok", check
    assert statuses[("scores_uses_current_simulations", None)] == "ok"
    assert "all checks ok" in printed


def test_clear_errors_for_neurons_that_cannot_be_audited(graph):
    settings, storage, instance = graph
    defs = build_definitions(settings)
    assert locate(defs, settings, "0", "33") == ("00", OTHER_SHARD)  # first:2 of 32-63
    for layer, neuron, message in ((1, 0, "layer 1 is outside the model, which has layers 0-0"),
                                   (0, 64, "neuron 64 is outside the model"),
                                   (0, 5, "not selected"), (0, -1, "outside the model")):
        with pytest.raises(AuditError, match=message):
            locate(defs, settings, layer, neuron)
    # selected, but its shard was never run
    with pytest.raises(AuditError, match=r"run .*--partition '00\|32-63'.* first"):
        audit(storage, instance, 0, 32, OTHER_SHARD)
    # a neuron absent from a scored partition
    with pytest.raises(AuditError, match="has no score in scores"):
        audit(storage, instance, 0, 7, SHARD)


def test_consistency_checks_report_tampered_tables(graph, tmp_path):
    settings, storage, instance = graph
    copy = TableStorage(root=str(tmp_path / "data"))
    shutil.copytree(settings.storage, copy.root, ignore=shutil.ignore_patterns("llm_cache"))
    assert audit(copy, instance, 0, NEURON, SHARD)["ok"]

    scores = copy.read("scores", PARTITION)
    copy.write(scores.with_columns(pl.when((pl.col("neuron") == NEURON) & (pl.col("variant") == "llm"))
                                   .then(pl.lit("0123456789abcdef")).otherwise(pl.col("explanation_id"))
                                   .alias("explanation_id")), "scores", PARTITION)
    explanations = copy.read("explanations", PARTITION)
    copy.write(explanations.with_columns(pl.lit("ffffffffffffffff").alias("prompt_version")),
               "explanations", PARTITION)
    records = copy.read("neuron_records", "00", "records")
    copy.write(records.with_columns(pl.when(pl.col("neuron") == NEURON).then(pl.col("activations").list.eval(
        pl.element() * 2)).otherwise(pl.col("activations")).alias("activations")), "neuron_records", "00", "records")

    result = audit(copy, instance, 0, NEURON, SHARD)
    bad = checks_of(result, "MISMATCH")
    assert not result["ok"]
    assert ("score_explanation_id", "llm") in bad and ("score_explanation_id", "token_baseline") not in bad
    assert {("prompt_version_matches_code_version", v) for v in ("llm", "token_baseline")} <= set(bad)
    assert {("score_records_hash", v) for v in ("llm", "token_baseline")} <= set(bad)
    assert ("explanation_records_hash", "llm") in bad
    for asset in ("scores", "explanations", "neuron_records"):
        assert (f"{asset}_file_matches_materialization", None) in bad
    assert ("simulations_file_matches_materialization", None) not in bad
    assert ("simulation_explanation_id", "llm") not in bad  # the simulations are untouched
    printed = format_audit(result)
    assert "MISMATCH score_explanation_id [llm]" in printed and "MISMATCH(es)" in printed

    sims = copy.read("simulations", PARTITION)
    copy.write(sims.with_columns(pl.lit("0123456789abcdef").alias("explanation_id")), "simulations", PARTITION)
    bad = checks_of(audit(copy, instance, 0, NEURON, SHARD), "MISMATCH")
    assert {("simulation_explanation_id", v) for v in ("llm", "token_baseline")} <= set(bad)
    assert ("score_explanation_id", "token_baseline") not in bad  # the score still names its explanation


def test_new_weights_after_the_records_are_a_mismatch(graph):
    settings, storage, instance = graph
    before = audit(storage, instance, 0, NEURON, SHARD)["subject_model_weights"]["data_version"]
    instance.report_runless_asset_event(
        AssetObservation("subject_model_weights", partition="00", tags={"dagster/data_version": "w-after"}))
    result = audit(storage, instance, 0, NEURON, SHARD)
    weights = result["subject_model_weights"]
    assert weights["data_version"] == "w-after" and weights["kind"] == "observation"
    assert weights["version_used_by_neuron_records"] == before  # the records were made from the old weights
    assert checks_of(result)[("neuron_records_uses_current_subject_model_weights", None)] == "MISMATCH"
    assert f"neuron_records[00] used version {before}" in format_audit(result) and not result["ok"]
    instance.report_runless_asset_event(  # the checkpoint is put back: consistent again
        AssetObservation("subject_model_weights", partition="00", tags={"dagster/data_version": before}))
    assert audit(storage, instance, 0, NEURON, SHARD)["ok"]


def test_a_new_scores_materialization_changes_the_reported_run(graph):
    settings, storage, instance = graph
    before = audit(storage, instance, 0, NEURON, SHARD)
    materialize_runs(build_definitions(settings), instance, [(("scores",), PARTITION)], log=lambda _: None)
    after = audit(storage, instance, 0, NEURON, SHARD)
    run = latest(instance, "scores", PARTITION).run_id
    assert after["scores"]["materialization"]["run_id"] == run != before["scores"]["materialization"]["run_id"]
    assert after["explanations"]["materialization"] == before["explanations"]["materialization"]
    assert after["ok"], format_audit(after)
    assert run in format_audit(after)


def test_an_upstream_rematerialized_after_the_score_is_a_mismatch(graph):
    """Last: it records a simulations version the file does not have."""
    settings, storage, instance = graph
    instance.report_runless_asset_event(
        AssetMaterialization("simulations", partition=PARTITION, tags={"dagster/data_version": "0000000000000000"}))
    records = instance.fetch_materializations(
        AssetRecordsFilter(AssetKey("simulations"), asset_partitions=[PARTITION]), limit=1).records
    assert records[0].asset_materialization.tags["dagster/data_version"] == "0000000000000000"
    result = audit(storage, instance, 0, NEURON, SHARD)
    bad = checks_of(result, "MISMATCH")
    assert set(bad) == {("scores_uses_current_simulations", None), ("simulations_file_matches_materialization", None)}
    detail = next(c["detail"] for c in result["checks"] if c["check"] == "scores_uses_current_simulations")
    assert "rematerialize scores" in detail


def test_the_command_line_parser_and_a_missing_instance(graph, tmp_path, monkeypatch):
    import argparse

    from neuron_assets.audit import add_audit_parser, run_audit

    parser = argparse.ArgumentParser()
    add_audit_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["audit", "0", str(NEURON)])
    assert (args.layer, args.neuron, args.run) == (0, NEURON, run_audit)
    settings, _, _ = graph
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "nowhere"))
    with pytest.raises(AuditError, match="no Dagster instance"):
        main_audit(args, settings=settings)
