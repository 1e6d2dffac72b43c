"""`neuron-assets audit`: the lineage of a neuron's scores, on a tiny 1-layer GPT-2 graph run with
every feature at its default (revision on, shuffled controls, detection on).

The tests share one materialization; the tests that add events to the instance come last, and
those that change it for good after those that only add events they undo.
"""

import argparse
import re
import shutil
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import polars as pl
import pytest
from dagster import (
    AssetDep,
    AssetKey,
    AssetMaterialization,
    AssetObservation,
    AssetRecordsFilter,
    DataVersion,
    Definitions,
    MaterializeResult,
    MultiToSingleDimensionPartitionMapping,
    asset,
)
from pipeline import in_memory_instance, run_graph, tiny_settings
from tiny_models import build_tiny_model

from neuron_assets.assets.common import CONTENT_HASH
from neuron_assets.audit import (
    AuditError,
    add_audit_parser,
    audit,
    audit_all,
    find_step,
    format_audit,
    locate,
    main_audit,
    run_audit,
)
from neuron_assets.cli import materialize_runs
from neuron_assets.definitions import build_definitions
from neuron_assets.resources.storage import TableStorage

SHARD, OTHER_SHARD = "00-31", "32-63"  # 64 neurons in 2 shards; first:2 neurons of the first shard are run
PARTITION = f"00|{SHARD}"
NEURON, DONOR = 1, 0  # with 2 neurons, each control gives neuron 1 the explanation of neuron 0
VARIANTS = ("llm", "token_baseline", "revised")
CONTROLS = tuple(f"{v}_shuffled" for v in VARIANTS)
TABLE = {"llm": "explanations", "token_baseline": "explanations", "revised": "revised_explanations"}


@pytest.fixture(scope="module")
def graph(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("audit")
    model = build_tiny_model("gpt2", tmp / "model", n_layers=1, max_positions=4096)
    settings = tiny_settings(model, tmp, revision="on", control="shuffled", detection="on")
    with in_memory_instance() as instance:
        storage = run_graph(settings, instance, ("00",), shards=[SHARD])
        yield settings, storage, instance, build_definitions(settings)


def latest(instance, asset, partition=None):
    records = instance.fetch_materializations(AssetKey(asset), limit=100).records
    return next(r for r in records if r.partition_key == partition)


def checks_of(result, status=None):
    return {(c["check"], c["variant"]): c["status"] for c in result["checks"]
            if status is None or c["status"] == status}


def detail_of(result, check, variant=None):
    return next(c["detail"] for c in result["checks"] if (c["check"], c["variant"]) == (check, variant))


def input_of(result, reader, reader_partition, asset):
    """What the lineage step reader[reader_partition] read of `asset`: used and current version."""
    return next(i for i in find_step(result, reader, reader_partition)["inputs"] if i["asset"] == asset)


def tampered_copy(settings, tmp_path) -> TableStorage:
    copy = TableStorage(root=str(tmp_path / "data"))
    shutil.copytree(settings.storage, copy.root, ignore=shutil.ignore_patterns("llm_cache"))
    return copy


def double_activations(storage, neuron):
    records = storage.read("neuron_records", "00", "records")
    storage.write(records.with_columns(pl.when(pl.col("unit") == neuron).then(pl.col("activations").list.eval(
        pl.element() * 2)).otherwise(pl.col("activations")).alias("activations")), "neuron_records", "00", "records")


def parse(*argv):
    parser = argparse.ArgumentParser()
    add_audit_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["audit", *argv])


def test_audit_names_the_runs_and_versions_that_produced_each_partition(graph, capsys):
    settings, storage, instance, _ = graph
    result = main_audit(SimpleNamespace(layer=0, unit=NEURON), settings=settings, instance=instance)
    printed = capsys.readouterr().out
    assert result["partition"] == PARTITION and result["shard"] == SHARD
    for asset, partition in (("scores", PARTITION), ("simulations", PARTITION), ("explanations", PARTITION),
                             ("revised_explanations", PARTITION), ("neuron_records", "00"), ("corpus_tokens", None),
                             ("corpus_documents", None)):
        record = latest(instance, asset, partition)
        m = find_step(result, asset, partition)["event"]
        tags = record.asset_materialization.tags
        assert m["run_id"] == record.run_id and m["timestamp"] == record.timestamp
        assert m["data_version"] == tags["dagster/data_version"] and m["code_version"] == tags["dagster/code_version"]
        assert record.run_id in printed and tags["dagster/data_version"] in printed
    # the score, simulation and explanation steps share one run; the records and tokens have their own
    runs = {s: find_step(result, *s)["event"]["run_id"] for s in (
        ("scores", PARTITION), ("explanations", PARTITION), ("neuron_records", "00"), ("corpus_tokens", None))}
    assert runs[("scores", PARTITION)] == runs[("explanations", PARTITION)] and len(set(runs.values())) == 3
    # newest first: each step before everything it was computed from
    order = [(s["asset"], s["partition"]) for s in result["lineage"]]
    assert order[0] == ("scores", PARTITION)
    assert order.index(("simulations", PARTITION)) < order.index(("explanations", PARTITION)) \
        < order.index(("neuron_records", "00")) < order.index(("corpus_tokens", None))

    scores = storage.read("scores", PARTITION).filter(pl.col("unit") == NEURON).sort("variant")
    assert [r["variant"] for r in result["scores"]["rows"]] == sorted(VARIANTS + CONTROLS)
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
    content_hash = find_step(result, "neuron_records", "00")["event"]["metadata"][CONTENT_HASH]
    assert content_hash == records.metadata[CONTENT_HASH].value and f"content hash {content_hash}" in printed
    assert result["neuron_records"]["records"]["top"] == settings.top_records
    tokens = input_of(result, "neuron_records", "00", "corpus_tokens")
    assert tokens["used"] == tokens["current"] == find_step(result, "corpus_tokens")["event"]["data_version"]
    weights = find_step(result, "subject_model_weights", "00")  # observed before the records (run_graph)
    assert weights["kind"] == "observation" and len(weights["event"]["data_version"]) == 16
    used = input_of(result, "neuron_records", "00", "subject_model_weights")
    assert used["observable"] and used["used"] == used["current"] == weights["event"]["data_version"]
    assert "subject_model_weights[00]: observation in run" in printed
    # every observable source the walk reaches (the weights, and the settings sources where the
    # graph has them) is named with the version each step that reads it used
    for source in (s for s in result["lineage"] if s["observable"]):
        readers = [r for r in result["lineage"] if any(i["label"] == source["label"] for i in r["inputs"])]
        assert readers and source["event"] is not None, source["label"]
        assert f"{source['label']} version {source['event']['data_version']}" in printed
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
                  "simulated_sequences_are_splits"):
        assert statuses[(check, "llm")] == statuses[(check, "token_baseline")] == "ok", check
    for edge in ("scores_uses_current_simulations", "simulations_uses_current_explanations",
                 "neuron_records_uses_current_subject_model_weights", "corpus_tokens_uses_current_corpus_documents"):
        assert statuses[(edge, None)] == "ok", edge
    for asset in ("scores", "simulations", "explanations", "revised_explanations", "neuron_records", "corpus_tokens",
                  "corpus_documents"):
        assert statuses[(f"{asset}_file_matches_materialization", None)] == "ok", asset
    assert "all checks ok" in printed


def test_every_variant_and_control_passes_and_controls_name_their_donor(graph, tmp_path, capsys):
    settings, storage, instance, defs = graph
    result = audit(storage, instance, 0, NEURON, SHARD, settings=settings, defs=defs)
    assert result["ok"], format_audit(result)
    assert result["explanations"]["sources"] == ["explanations", "revised_explanations"]  # from the graph
    variants = {e["variant"]: e for e in result["explanations"]["variants"]}
    assert set(variants) == {r["variant"] for r in result["scores"]["rows"]} == set(VARIANTS + CONTROLS)
    statuses = checks_of(result)
    for variant in VARIANTS + CONTROLS:
        for check in ("score_explanation_id", "score_explanation_text", "simulation_explanation_id",
                      "score_records_hash", "simulated_sequences_are_splits", "explanation_records_hash",
                      "prompt_version_matches_code_version", "explanation_code_version_matches_materialization"):
            assert statuses[(check, variant)] == "ok", (check, variant)
    for variant in VARIANTS:
        assert variants[variant]["origin"] == f"{TABLE[variant]}[{PARTITION}]"
        assert variants[variant]["donor_unit"] is None
    for variant, control in zip(VARIANTS, CONTROLS):
        donor_row = storage.read(TABLE[variant], PARTITION).filter(
            (pl.col("unit") == DONOR) & (pl.col("variant") == variant)).row(0, named=True)
        e = variants[control]
        assert e["donor_unit"] == DONOR and e["text"] == donor_row["text"] and e["source"] == TABLE[variant]
        assert e["origin"] == f"control of {variant}, donor neuron {DONOR} ({TABLE[variant]}[{PARTITION}])"
        assert statuses[("score_donor_unit", control)] == "ok"
        # the control carries the donor's records hash: checked against the donor's records
        assert e["records_hash"] == donor_row["records_hash"]
        assert f"donor neuron {DONOR}'s" in detail_of(result, "explanation_records_hash", control)
    # the revision names the llm explanation it revises, and hashes the held-out records
    assert statuses[("revised_from_current_explanation", "revised")] == "ok"
    assert "held-out records" in detail_of(result, "explanation_records_hash", "revised")
    assert "revised_explanations[00|00-31] code version" in detail_of(
        result, "prompt_version_matches_code_version", "revised")
    printed = format_audit(result)
    assert f"llm_shuffled             from control of llm, donor neuron {DONOR}" in printed

    # the donor's records changed: the controls' explanation hashes break, the neuron's own do not
    copy = tampered_copy(settings, tmp_path)
    double_activations(copy, DONOR)
    bad = checks_of(audit(copy, instance, 0, NEURON, SHARD, settings=settings, defs=defs), "MISMATCH")
    assert {("explanation_records_hash", c) for c in CONTROLS} <= set(bad)
    assert not {("explanation_records_hash", v) for v in VARIANTS} & set(bad)
    assert not {("score_records_hash", v) for v in VARIANTS + CONTROLS} & set(bad)  # scored on its own records


def test_clear_errors_for_neurons_that_cannot_be_audited(graph):
    settings, storage, instance, defs = graph
    assert locate(defs, settings, "0", "33") == ("00", OTHER_SHARD)  # first:2 of 32-63
    for layer, neuron, message in ((1, 0, "layer 1 is outside the model, which has layers 0-0"),
                                   (0, 64, "unit 64 is outside layer 00, whose units are 0-63"),
                                   (0, 5, "not selected"), (0, -1, "unit -1 is outside layer 00")):
        with pytest.raises(AuditError, match=message):
            locate(defs, settings, layer, neuron)
    # selected, but its shard was never run
    with pytest.raises(AuditError, match=r"run .*--partition '00\|32-63'.* first"):
        audit(storage, instance, 0, 32, OTHER_SHARD, settings=settings, defs=defs)
    # a neuron absent from a scored partition
    with pytest.raises(AuditError, match="has no score in scores"):
        audit(storage, instance, 0, 7, SHARD, settings=settings, defs=defs)


def test_the_command_line_parser_and_a_missing_instance(graph, tmp_path, monkeypatch):
    args = parse("0", str(NEURON))
    assert (args.layer, args.unit, args.all, args.run) == (0, NEURON, False, run_audit)
    assert (parse("--all").layer, parse("--all").all) == (None, True)
    assert (parse("--all", "0").layer, parse("0", "--all").layer) == (0, 0)
    settings, _, instance, _ = graph
    for argv, message in ((("0",), "audit takes a LAYER and a UNIT"), ((), "audit takes a LAYER and a UNIT"),
                          (("0", "1", "--all"), "--all takes at most a LAYER, not a unit"),
                          (("--all", "1"), "layer 1 is outside the model")):
        with pytest.raises(AuditError, match=message):
            main_audit(parse(*argv), settings=settings, instance=instance)
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "nowhere"))
    for argv in (("0", str(NEURON)), ("--all",)):
        with pytest.raises(AuditError, match="no Dagster instance"):
            main_audit(parse(*argv), settings=settings)


SUMMARY = re.compile(r"^audited 2 units in 1 layer x 1 shard: (\d) ok, (\d) with a mismatch \((\d+) checks\)$")


def test_audit_all_summarizes_every_scored_neuron(graph, tmp_path, capsys):
    settings, storage, instance, defs = graph
    run_audit(parse("--all"), settings=settings, instance=instance)  # returns: no SystemExit
    lines = capsys.readouterr().out.strip().splitlines()
    each = [audit(storage, instance, 0, n, SHARD, settings=settings, defs=defs) for n in (DONOR, NEURON)]
    assert len(lines) == 1 and SUMMARY.match(lines[0]).groups() == (
        "2", "0", str(sum(len(r["checks"]) for r in each))), lines
    assert audit_all(storage, instance, settings, defs=defs, layer=0)["n_ok"] == 2

    # a tampered copy: the neuron's line names its checks; the file check fails for both neurons
    copy = tampered_copy(settings, tmp_path)
    scores = copy.read("scores", PARTITION)
    copy.write(scores.with_columns(pl.when((pl.col("unit") == NEURON) & (pl.col("variant") == "llm"))
                                   .then(pl.lit("0123456789abcdef")).otherwise(pl.col("explanation_id"))
                                   .alias("explanation_id")), "scores", PARTITION)
    with pytest.raises(SystemExit) as exit_:
        run_audit(parse("--all", "0"), settings=replace(settings, storage=copy.root), instance=instance)
    assert exit_.value.code == 1
    lines = capsys.readouterr().out.strip().splitlines()
    assert SUMMARY.match(lines[-1]).groups()[:2] == ("0", "2")
    neuron_line = next(line for line in lines if line.startswith(f"MISMATCH layer 00 unit {NEURON} "))
    donor_line = next(line for line in lines if line.startswith(f"MISMATCH layer 00 unit {DONOR} "))
    assert "score_explanation_id [llm]" in neuron_line and "scores_file_matches_materialization" in neuron_line
    assert "score_explanation_id" not in donor_line and "scores_file_matches_materialization" in donor_line


def test_consistency_checks_report_tampered_tables(graph, tmp_path):
    settings, storage, instance, defs = graph
    copy = tampered_copy(settings, tmp_path)
    assert audit(copy, instance, 0, NEURON, SHARD, settings=settings, defs=defs)["ok"]

    scores = copy.read("scores", PARTITION)
    copy.write(scores.with_columns(pl.when((pl.col("unit") == NEURON) & (pl.col("variant") == "llm"))
                                   .then(pl.lit("0123456789abcdef")).otherwise(pl.col("explanation_id"))
                                   .alias("explanation_id")), "scores", PARTITION)
    explanations = copy.read("explanations", PARTITION)
    copy.write(explanations.with_columns(pl.lit("ffffffffffffffff").alias("prompt_version")),
               "explanations", PARTITION)
    double_activations(copy, NEURON)

    result = audit(copy, instance, 0, NEURON, SHARD, settings=settings, defs=defs)
    bad = checks_of(result, "MISMATCH")
    assert not result["ok"]
    assert ("score_explanation_id", "llm") in bad and ("score_explanation_id", "token_baseline") not in bad
    # the explanations table's rows and their controls (the donor's rows of that table), not the revisions
    assert {("prompt_version_matches_code_version", v) for v in ("llm", "token_baseline", "llm_shuffled",
                                                                 "token_baseline_shuffled")} <= set(bad)
    assert not {("prompt_version_matches_code_version", v) for v in ("revised", "revised_shuffled")} & set(bad)
    assert {("score_records_hash", v) for v in VARIANTS + CONTROLS} <= set(bad)
    # its own explanations hash its records; its controls hash the donor's, which are untouched
    assert {("explanation_records_hash", v) for v in ("llm", "token_baseline", "revised")} <= set(bad)
    assert not {("explanation_records_hash", v) for v in CONTROLS} & set(bad)
    for asset in ("scores", "explanations", "neuron_records"):
        assert (f"{asset}_file_matches_materialization", None) in bad
    for asset in ("simulations", "revised_explanations", "corpus_tokens"):
        assert (f"{asset}_file_matches_materialization", None) not in bad
    assert "records hashes to" in detail_of(result, "neuron_records_file_matches_materialization")
    assert ("simulation_explanation_id", "llm") not in bad  # the simulations are untouched
    printed = format_audit(result)
    assert "MISMATCH score_explanation_id [llm]" in printed and "MISMATCH(es)" in printed

    sims = copy.read("simulations", PARTITION)
    copy.write(sims.with_columns(pl.lit("0123456789abcdef").alias("explanation_id")), "simulations", PARTITION)
    bad = checks_of(audit(copy, instance, 0, NEURON, SHARD, settings=settings, defs=defs), "MISMATCH")
    assert {("simulation_explanation_id", v) for v in VARIANTS + CONTROLS} <= set(bad)
    assert ("score_explanation_id", "token_baseline") not in bad  # the score still names its explanation

    (Path(copy.root) / "corpus_tokens" / "data.parquet").unlink()
    detail = detail_of(audit(copy, instance, 0, NEURON, SHARD, settings=settings, defs=defs),
                       "corpus_tokens_file_matches_materialization")
    assert "is missing" in detail


def test_new_weights_after_the_records_are_a_mismatch(graph):
    settings, storage, instance, defs = graph
    before = find_step(audit(storage, instance, 0, NEURON, SHARD, settings=settings, defs=defs),
                       "subject_model_weights", "00")["event"]["data_version"]
    instance.report_runless_asset_event(
        AssetObservation("subject_model_weights", partition="00", tags={"dagster/data_version": "w-after"}))
    result = audit(storage, instance, 0, NEURON, SHARD, settings=settings, defs=defs)
    weights = find_step(result, "subject_model_weights", "00")
    assert weights["event"]["data_version"] == "w-after" and weights["kind"] == "observation"
    used = input_of(result, "neuron_records", "00", "subject_model_weights")
    assert used["used"] == before and used["current"] == "w-after"  # the records were made from the old weights
    assert checks_of(result)[("neuron_records_uses_current_subject_model_weights", None)] == "MISMATCH"
    assert f"neuron_records[00] used version {before}" in format_audit(result) and not result["ok"]
    instance.report_runless_asset_event(  # the checkpoint is put back: consistent again
        AssetObservation("subject_model_weights", partition="00", tags={"dagster/data_version": before}))
    assert audit(storage, instance, 0, NEURON, SHARD, settings=settings, defs=defs)["ok"]


def test_a_new_scores_materialization_changes_the_reported_run(graph):
    settings, storage, instance, defs = graph
    before = audit(storage, instance, 0, NEURON, SHARD, settings=settings, defs=defs)
    materialize_runs(defs, instance, [(("scores",), PARTITION)], log=lambda _: None)
    after = audit(storage, instance, 0, NEURON, SHARD, settings=settings, defs=defs)
    run = latest(instance, "scores", PARTITION).run_id
    assert find_step(after, "scores", PARTITION)["event"]["run_id"] == run \
        != find_step(before, "scores", PARTITION)["event"]["run_id"]
    assert find_step(after, "explanations", PARTITION)["event"] == find_step(before, "explanations", PARTITION)["event"]
    assert after["ok"], format_audit(after)
    assert run in format_audit(after)


def test_a_table_an_older_code_version_left_goes_with_the_next_write(graph):
    """neuron_records once also wrote an output_tokens table. Left in the partition, the audit cannot
    tell it from a tampered file; the partition's next materialization removes it."""
    settings, storage, instance, defs = graph
    folder = Path(str(storage.path("neuron_records", "00"))).parent
    shutil.copy(folder / "stats.parquet", folder / "output_tokens.parquet")
    check = ("neuron_records_file_matches_materialization", None)
    assert checks_of(audit(storage, instance, 0, NEURON, SHARD, settings=settings, defs=defs))[check] == "MISMATCH"
    materialize_runs(defs, instance, [(("neuron_records",), "00")], log=lambda _: None)
    assert sorted(p.name for p in folder.glob("*.parquet")) == ["records.parquet", "stats.parquet"]
    result = audit(storage, instance, 0, NEURON, SHARD, settings=settings, defs=defs)
    assert checks_of(result)[check] == "ok" and result["ok"], format_audit(result)


def test_imported_explanations_and_their_control_are_audited(graph):
    """The published files of this run (exported_neurons) imported back as the 'imported' variant."""
    settings, storage, instance, defs = graph
    imported = replace(settings, import_from=str(Path(settings.storage) / "exported_neurons"))
    imported_defs = build_definitions(imported)
    materialize_runs(imported_defs, instance, [(("imported_explanations", "simulations", "scores"), PARTITION)],
                     log=lambda _: None)
    result = audit(storage, instance, 0, NEURON, SHARD, settings=imported, defs=imported_defs)
    assert result["ok"], format_audit(result)
    assert "imported_explanations" in result["explanations"]["sources"]
    variants = {e["variant"]: e for e in result["explanations"]["variants"]}
    assert variants["imported"]["origin"] == f"imported_explanations[{PARTITION}]"
    assert variants["imported_shuffled"]["origin"] == \
        f"control of imported, donor neuron {DONOR} (imported_explanations[{PARTITION}])"
    assert variants["imported"]["text"] == variants["llm"]["text"]  # the export puts llm first
    statuses = checks_of(result)
    for variant in ("imported", "imported_shuffled"):
        assert statuses[("score_explanation_id", variant)] == statuses[("score_records_hash", variant)] == "ok"
        # imported rows hash no records of ours, and carry the file's digest as their prompt version
        assert statuses[("explanation_records_hash", variant)] == "n/a"
        assert statuses[("prompt_version_matches_code_version", variant)] == "n/a"
    assert statuses[("scores_uses_current_imported_explanations", None)] == "ok"
    # under the default settings the imported rows are not among the variants: a mismatch until rerun
    bad = checks_of(audit(storage, instance, 0, NEURON, SHARD, settings=settings, defs=defs), "MISMATCH")
    assert ("score_explanation_id", "imported") in bad
    materialize_runs(defs, instance, [(("simulations", "scores"), PARTITION)], log=lambda _: None)
    assert audit(storage, instance, 0, NEURON, SHARD, settings=settings, defs=defs)["ok"]


def with_extra_table(defs: Definitions) -> Definitions:
    """`defs` with an asset the audit has never heard of between neuron_records and scores."""
    layers = defs.resolve_assets_def("neuron_records").partitions_def

    @asset(partitions_def=layers, deps=["neuron_records"], code_version="1", group_name="scores")
    def extra_table(context, storage: TableStorage) -> MaterializeResult:
        counts = storage.read("neuron_records", context.partition_key, "records").group_by("unit").len()
        return MaterializeResult(data_version=DataVersion(storage.write(counts.sort("unit"), "extra_table",
                                                                        context.partition_key)))

    by_layer = MultiToSingleDimensionPartitionMapping("layer")
    scores = next(a for a in defs.assets if getattr(a, "key", None) == AssetKey("scores"))
    scores = scores.map_asset_specs(
        lambda spec: spec.replace_attributes(deps=[*spec.deps, AssetDep("extra_table", partition_mapping=by_layer)]))
    others = [a for a in defs.assets if getattr(a, "key", None) != AssetKey("scores")]
    return Definitions(assets=[*others, scores, extra_table], resources=defs.resources)


def test_an_asset_added_to_the_graph_is_walked_unedited(graph):
    settings, storage, instance, defs = graph
    extended = with_extra_table(defs)
    assert AssetKey("extra_table") in extended.resolve_asset_graph().get(AssetKey("scores")).parent_keys
    materialize_runs(extended, instance, [(("extra_table",), "00"), (("scores",), PARTITION)], log=lambda _: None)
    result = audit(storage, instance, 0, NEURON, SHARD, settings=settings, defs=extended)
    assert result["ok"], format_audit(result)
    step = find_step(result, "extra_table", "00")
    assert step["event"]["run_id"] == latest(instance, "extra_table", "00").run_id
    statuses = checks_of(result)
    for check in ("scores_uses_current_extra_table", "extra_table_uses_current_neuron_records",
                  "extra_table_file_matches_materialization"):
        assert statuses[(check, None)] == "ok", check
    printed = format_audit(result)
    assert f"extra_table[00]: run {step['event']['run_id']}" in printed
    assert find_step(audit(storage, instance, 0, NEURON, SHARD, settings=settings, defs=defs),
                     "extra_table", "00") is None  # the walk follows the graph it is given

    instance.report_runless_asset_event(
        AssetMaterialization("extra_table", partition="00", tags={"dagster/data_version": "0000000000000000"}))
    bad = checks_of(audit(storage, instance, 0, NEURON, SHARD, settings=settings, defs=extended), "MISMATCH")
    assert set(bad) == {("scores_uses_current_extra_table", None), ("extra_table_file_matches_materialization", None)}


def test_an_upstream_rematerialized_after_the_score_is_a_mismatch(graph):
    """Last: it records a simulations version the file does not have."""
    settings, storage, instance, defs = graph
    instance.report_runless_asset_event(
        AssetMaterialization("simulations", partition=PARTITION, tags={"dagster/data_version": "0000000000000000"}))
    records = instance.fetch_materializations(
        AssetRecordsFilter(AssetKey("simulations"), asset_partitions=[PARTITION]), limit=1).records
    assert records[0].asset_materialization.tags["dagster/data_version"] == "0000000000000000"
    result = audit(storage, instance, 0, NEURON, SHARD, settings=settings, defs=defs)
    bad = checks_of(result, "MISMATCH")
    assert set(bad) == {("scores_uses_current_simulations", None), ("simulations_file_matches_materialization", None)}
    assert "rematerialize scores" in detail_of(result, "scores_uses_current_simulations")
