"""What reruns when something changes: one layer's weights, a code version, nothing at all.

One whole graph (tiny Llama, 3 layers x 2 shards, 1 neuron per shard) is materialized once for the
module; each test changes one thing, checks what Dagster reports stale and what the automation
sensor would request, refreshes, and counts materializations per partition before and after.
"""

import datetime
from collections import Counter
from dataclasses import replace

import pytest
import torch
from dagster import (
    AssetKey,
    build_schedule_context,
    build_sensor_context,
    evaluate_automation_conditions,
    instance_for_test,
)
from pipeline import tiny_settings
from tiny_models import build_tiny_model

from neuron_assets.cli import demo_runs, materialize_runs, shard_keys
from neuron_assets.definitions import build_definitions
from neuron_assets.refresh import STAGES, first_stage, observe_weights, refresh, refresh_runs, stale_partitions
from neuron_assets.resources.models import load_causal_lm
from neuron_assets.resources.subject_model import SubjectModel

LAYERS = ("00", "01", "02")
ASSETS = ("corpus_documents", "corpus_tokens", "neuron_records", "explanations", "simulations", "scores",
          "layer_summary", "model_summary", "exported_neurons", "neuron_viewer", "neuron_viewer_index")


def quiet(_):
    pass


def materializations(instance) -> Counter:
    """{(asset, partition): number of materializations}."""
    counts = Counter()
    for asset in ASSETS:
        for record in instance.fetch_materializations(AssetKey(asset), limit=10_000).records:
            counts[(asset, record.partition_key)] += 1
    return counts


def data_versions(instance) -> dict:
    """{(asset, partition): data version of its latest materialization}."""
    latest = {}
    for asset in ASSETS:
        for record in instance.fetch_materializations(AssetKey(asset), limit=10_000, ascending=True).records:
            latest[(asset, record.partition_key)] = record.asset_materialization.tags["dagster/data_version"]
    return latest


def requested(result) -> dict[str, set]:
    """What one automation evaluation requests: {asset: partitions}."""
    return {r.key.to_user_string(): set(map(str, r.true_subset.expensively_compute_partition_keys()))
            for r in result.results if r.true_subset.size and not r.key.to_user_string().startswith("[")}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("staleness")
    model = build_tiny_model("llama", tmp / "model", n_layers=3, max_positions=4096)
    settings = tiny_settings(model, tmp, neurons="first:1", max_windows=40)
    defs = build_definitions(settings)
    with instance_for_test() as instance:
        observe_weights(defs, instance, log=quiet)  # before neuron_records: its provenance points at it
        materialize_runs(defs, instance, demo_runs(LAYERS, shard_keys(defs)), log=quiet)
        yield settings, defs, instance


def test_nothing_changed_launches_nothing(world):
    settings, defs, instance = world
    assert stale_partitions(defs, instance) == []
    start = evaluate_automation_conditions(defs=defs, instance=instance)
    before = materializations(instance)
    lines = []
    assert refresh(defs, instance, dry_run=True, log=lines.append) == []
    assert lines[-1].startswith("nothing is stale")
    # What the nightly schedule does: observe the weights and re-materialize the unchanged corpus.
    schedule = defs.get_repository_def().get_schedule_def("observe_sources_nightly")
    tick = schedule.evaluate_tick(build_schedule_context(
        instance=instance, scheduled_execution_time=datetime.datetime(2026, 1, 2, 3)))
    assert [[k.to_user_string() for k in r.asset_selection] for r in tick.run_requests] == [
        ["subject_model_weights"], ["corpus_documents"]]
    materialize_runs(defs, instance, [(("subject_model_weights",), None), (("corpus_documents",), None)], log=quiet)
    assert stale_partitions(defs, instance) == []  # same content hash, same weight hashes
    # Dagster's eager() alone would rerun corpus_tokens here (a new materialization); ours waits for a new version.
    assert requested(evaluate_automation_conditions(defs=defs, instance=instance, cursor=start.cursor)) == {}
    assert refresh(defs, instance, log=quiet) == []
    after = materializations(instance)
    assert after - before == Counter({("corpus_documents", None): 1})


def test_new_weights_in_one_layer_rerun_exactly_that_layer(world):
    settings, defs, instance = world
    start = evaluate_automation_conditions(defs=defs, instance=instance)
    before, versions = materializations(instance), data_versions(instance)
    hashes = SubjectModel(model=settings.model, cache=settings.cache, device="cpu").layer_hashes([0, 1, 2])

    # A checkpoint in which only layer 1 differs, written over the old one at the same path.
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(settings.model)
    with torch.no_grad():
        for p in model.model.layers[1].parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(settings.model)
    # In practice a new checkpoint is read by a new process (every Dagster run, every CLI call);
    # this test process still holds the old model in load_causal_lm's cache.
    load_causal_lm.cache_clear()

    new = SubjectModel(model=settings.model, cache=settings.cache, device="cpu").layer_hashes([0, 1, 2])
    assert new[0] == hashes[0] and new[2] == hashes[2] and new[1] != hashes[1]
    observe_weights(defs, instance, log=quiet)
    stale = stale_partitions(defs, instance)
    assert [(a, p) for a, p, _ in stale] == [("neuron_records", "01")]
    assert "subject_model_weights[01]" in stale[0][2]
    # The automation sensor would request the same partition, and nothing else.
    assert requested(evaluate_automation_conditions(defs=defs, instance=instance, cursor=start.cursor)) == {
        "neuron_records": {"01"}}
    sensor = defs.get_repository_def().get_sensor_def("refresh_stale_partitions")
    tick = sensor.evaluate_tick(build_sensor_context(instance=instance, repository_def=defs.get_repository_def()))
    assert [(r.job_name, r.partition_key) for r in tick.run_requests] == [("layer_assets", "01")]
    assert refresh(defs, instance, dry_run=True, log=quiet) == [(("neuron_records",), "01")]

    refresh(defs, instance, log=quiet)
    after = materializations(instance)
    shards = shard_keys(defs)
    rerun = {("neuron_records", "01"), ("layer_summary", "01"), ("model_summary", None), ("exported_neurons", "01"),
             ("neuron_viewer", "01"), ("neuron_viewer_index", None)}
    rerun |= {(asset, f"01|{s}") for asset in ("explanations", "simulations", "scores") for s in shards}
    assert after - before == Counter(dict.fromkeys(rerun, 1))
    now = data_versions(instance)
    for (asset, partition), version in versions.items():
        if (asset, partition) not in rerun:
            assert now[(asset, partition)] == version, (asset, partition)
    assert now[("neuron_records", "01")] != versions[("neuron_records", "01")]
    assert stale_partitions(defs, instance) == []


def test_new_simulations_code_version_reruns_simulations_and_scores(world):
    settings, defs, instance = world
    start = evaluate_automation_conditions(defs=defs, instance=instance)
    before = materializations(instance)
    version = defs.resolve_assets_def("simulations").specs_by_key[AssetKey("simulations")].code_version
    changed = build_definitions(settings, code_versions={"simulations": f"{version}-changed"})

    stale = stale_partitions(changed, instance)
    partitions = {f"{layer}|{s}" for layer in LAYERS for s in shard_keys(changed)}
    assert {(a, p) for a, p, _ in stale} == {("simulations", p) for p in partitions}
    assert all(reason == "has a new code version" for _, _, reason in stale)
    assert requested(evaluate_automation_conditions(defs=changed, instance=instance, cursor=start.cursor)) == {
        "simulations": partitions, "scores": partitions}

    runs = refresh(changed, instance, log=quiet)
    # the new simulation rows carry the new code version: the export and the viewer (which read them) follow;
    # the same simulated values give the same pages (same data versions), so the viewer's index does not
    assert runs == [(("simulations", "scores"), p) for p in sorted(partitions)] + [
        (("exported_neurons", "neuron_viewer"), layer) for layer in LAYERS]
    diff = materializations(instance) - before
    assert {k for k in diff if k[0] in ("simulations", "scores")} == {
        (a, p) for a in ("simulations", "scores") for p in partitions}
    assert not [k for k in diff if k[0] in ("corpus_tokens", "neuron_records", "explanations")]
    assert stale_partitions(changed, instance) == []


def test_missing_partitions_are_proposed_only_where_their_inputs_exist(world, tmp_path):
    settings, _, _ = world
    defs = build_definitions(replace(settings, storage=str(tmp_path / "data")))
    with instance_for_test() as instance:
        assert stale_partitions(defs, instance) == [("corpus_documents", None, "missing; its inputs exist")]
        materialize_runs(defs, instance, [(("corpus_documents", "corpus_tokens"), None)], log=quiet)
        stale = stale_partitions(defs, instance)
        assert [(a, p) for a, p, _ in stale] == [("neuron_records", k) for k in LAYERS]
        assert refresh_runs(first_stage(stale)) == [(("neuron_records",), ("00", "02"))]
        materialize_runs(defs, instance, [(("neuron_records",), "00")], log=quiet)
        # explanations of layer 00 can run; nothing of layers 01-02, nothing that needs explanations
        assert [(a, p) for a, p, _ in stale_partitions(defs, instance)] == [
            ("neuron_records", "01"), ("neuron_records", "02")] + [
            ("explanations", f"00|{s}") for s in shard_keys(defs)]
        assert stale_partitions(defs, instance, include_missing=False) == []
        # neuron_records[00] ran before the weights were ever observed: Dagster records no pointer to
        # an observation and would never see a change; refresh treats it as stale once observed.
        observe_weights(defs, instance, log=quiet)
        assert stale_partitions(defs, instance, include_missing=False) == [
            ("neuron_records", "00", "materialized before subject_model_weights was first observed")]


def test_refresh_jobs_hold_the_assets_the_settings_add(world, tmp_path):
    settings, _, _ = world
    defs = build_definitions(replace(settings, revision="on", detection="on", import_from=str(tmp_path)))
    jobs = {name: {k.to_user_string() for k in defs.resolve_job_def(name).asset_layer.executable_asset_keys}
            for name in ("unpartitioned_assets", "layer_assets", "layer_shard_assets")}
    assert jobs == {
        "unpartitioned_assets": {"corpus_documents", "corpus_tokens", "model_summary", "neuron_viewer_index"},
        "layer_assets": {"neuron_records", "layer_summary", "exported_neurons", "neuron_viewer"},
        "layer_shard_assets": {"explanations", "revised_explanations", "imported_explanations", "simulations",
                               "scores", "detection_scores"},
    }
    # every run the refresh can ask for fits in one of those jobs
    for stage in STAGES:
        for asset in stage:
            assert sum(asset in names for names in jobs.values()) == 1, asset


def test_refresh_runs_group_by_stage():
    stale = [("model_summary", None, ""), ("layer_summary", "03", ""), ("scores", "03|a", ""),
             ("simulations", "03|a", ""), ("explanations", "04|b", ""), ("neuron_records", "05", ""),
             ("neuron_records", "02", ""), ("neuron_records", "03", ""), ("corpus_tokens", None, ""),
             ("detection_scores", "05|a", ""), ("imported_explanations", "05|b", "")]
    shard = ("explanations", "revised_explanations", "simulations", "scores", "detection_scores")
    assert refresh_runs(stale) == [
        (("corpus_tokens",), None),
        (("neuron_records",), ("02", "03")),
        (("neuron_records",), "05"),
        (("simulations", "scores"), "03|a"),
        (shard, "04|b"),
        (("detection_scores",), "05|a"),  # the judge reads explanations, not simulations
        (("imported_explanations", "simulations", "scores", "detection_scores"), "05|b"),
        (("layer_summary",), "03"),
        (("model_summary",), None),
    ]
    # Layers 0, 5, 10 as the only layer partitions: neighbours in that order are one range.
    assert refresh_runs([("neuron_records", k, "") for k in ("00", "05")], ["00", "05", "10"]) == [
        (("neuron_records",), ("00", "05"))]


@pytest.mark.parametrize("arch", ["gpt2", "gpt_neox"])
def test_layer_hashes_follow_each_architectures_names(arch, tmp_path):
    path = build_tiny_model(arch, tmp_path / "model", n_layers=2)
    subject = SubjectModel(model=str(path), cache=str(tmp_path / "cache"), device="cpu")
    hashes = subject.layer_hashes([0, 1])
    assert len(set(hashes.values())) == 2 and all(len(h) == 16 for h in hashes.values())
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path)
    with torch.no_grad():
        block = model.get_submodule("transformer.h.0" if arch == "gpt2" else "gpt_neox.layers.0")
        next(block.parameters()).add_(1)
    model.save_pretrained(path)
    changed = subject.layer_hashes([0, 1])
    assert changed[0] != hashes[0] and changed[1] == hashes[1]
