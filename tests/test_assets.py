"""The whole asset graph on tiny random-weight GPT-2 and Llama models, through dagster's executor."""

import math

import numpy as np
import polars as pl
import pytest
import torch
from dagster import AssetKey, DagsterEventType, EventRecordsFilter
from pipeline import in_memory_instance, run_graph, tiny_settings
from tiny_models import build_tiny_model

from neuron_assets.resources.models import load_causal_lm, neuron_module
from neuron_assets.resources.subject_model import SubjectModel


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def graph(request, tmp_path_factory):
    """One whole-graph materialization per architecture, shared by the tests of this module."""
    tmp = tmp_path_factory.mktemp(request.param)
    model = build_tiny_model(request.param, tmp / "model", n_layers=2, max_positions=4096)
    settings = tiny_settings(model, tmp)
    with in_memory_instance() as instance:
        storage = run_graph(settings, instance, ("00", "01"))
        yield settings, storage, instance


def test_neuron_records_hold_the_true_top_windows(graph):
    settings, storage, _ = graph
    tokens = storage.read("corpus_tokens")
    ids = torch.tensor(np.stack(tokens["token_ids"].to_numpy()), dtype=torch.long)
    model, _ = load_causal_lm(settings.model, settings.cache, "cpu")
    captured = []
    handle = neuron_module(model, 1).register_forward_pre_hook(lambda m, a: captured.append(a[0]))
    with torch.inference_mode():
        model(input_ids=ids)
    handle.remove()
    truth = captured[0].numpy()  # [windows, T, N]
    records = storage.read("neuron_records", "01", "records")
    n_neurons = truth.shape[2]
    assert records["unit"].n_unique() == n_neurons
    for neuron in (0, 5, n_neurons - 1):
        top = records.filter((pl.col("unit") == neuron) & (pl.col("kind") == "top")).sort("rank")
        assert top.height == settings.top_records
        window_max = truth[:, :, neuron].max(axis=1)
        expected = np.argsort(-window_max, kind="stable")[: settings.top_records]
        assert top["seq_id"].to_list() == expected.tolist()
        np.testing.assert_allclose(np.asarray(top["activations"][0]), truth[expected[0], :, neuron], rtol=1e-5)
    stats = storage.read("neuron_records", "01", "stats")
    np.testing.assert_allclose(stats.sort("unit")["mean"].to_numpy(), truth.mean(axis=(0, 1)), rtol=1e-4, atol=1e-6)
    assert records.filter(pl.col("kind") == "random").group_by("unit").len()["len"].min() == settings.random_records


def test_every_stage_writes_rows_for_the_selected_neurons(graph):
    settings, storage, _ = graph
    for layer in ("00", "01"):
        for shard, first in (("00-31", 0), ("32-63", 32)):
            explanations = storage.read("explanations", f"{layer}|{shard}")
            neurons = sorted(set(explanations["unit"]))
            assert neurons == [first, first + 1]  # first:2 of the shard
            assert set(explanations["variant"]) == {"llm", "token_baseline"}
            ok = explanations.filter(pl.col("error").is_null())
            assert ok.height >= 2 and ok["text"].str.len_chars().min() > 0
            sims = storage.read("simulations", f"{layer}|{shard}")
            for (neuron, variant), group in sims.group_by("unit", "variant"):
                if group["error"].is_null().all():
                    # the valid split, then the calibration split: each 5 top + 5 random
                    assert group["split"].to_list() == ["valid"] * 10 + ["calibration"] * 10
                    assert group["kind"].to_list().count("top") == 10
                    assert all(len(e) == settings.seq_len for e in group["expected"])
                    values = np.concatenate(group["expected"].to_list())
                    assert np.all((values >= 0) & (values <= 10))
            scores = storage.read("scores", f"{layer}|{shard}")
            assert scores.height == explanations.height
            for column in ("score_all", "score_top", "score_random"):
                values = scores[column].to_numpy()
                finite = values[np.isfinite(values)]
                assert np.all((finite >= -1) & (finite <= 1))
    summary = storage.read("model_summary")
    assert sorted(set(summary["layer"])) == [0, 1]
    assert set(summary["variant"]) == {"llm", "token_baseline"}
    assert summary["units"].sum() == 2 * 2 * 2 * 2  # layers x shards x neurons x variants


def test_scores_match_a_recomputation_from_the_tables(graph):
    from neuron_assets.method.scoring import correlation

    _, storage, _ = graph
    sims = storage.read("simulations", "00|00-31").filter(pl.col("error").is_null() & (pl.col("split") == "valid"))
    records = storage.read("neuron_records", "00", "records")
    scores = storage.read("scores", "00|00-31")
    neuron, variant = sims.row(0, named=True)["unit"], sims.row(0, named=True)["variant"]
    group = sims.filter((pl.col("unit") == neuron) & (pl.col("variant") == variant))
    real, simulated = [], []
    for kind, seq_id, expected in group.select("kind", "seq_id", "expected").iter_rows():
        row = records.filter((pl.col("unit") == neuron) & (pl.col("kind") == kind) & (pl.col("seq_id") == seq_id))
        real.append(np.asarray(row["activations"][0]))
        simulated.append(np.asarray(expected))
    stored = scores.filter((pl.col("unit") == neuron) & (pl.col("variant") == variant))["score_all"][0]
    assert stored == pytest.approx(correlation(real, simulated), nan_ok=True)


def test_materializations_carry_content_data_versions_and_passing_checks(graph):
    _, storage, instance = graph
    for asset, partition in (("corpus_tokens", None), ("explanations", "00|32-63"), ("scores", "01|00-31")):
        event = instance.get_latest_materialization_event(AssetKey(asset))
        records = instance.fetch_materializations(AssetKey(asset), limit=100).records
        if partition:
            records = [r for r in records if r.partition_key == partition]
        tags = records[0].asset_materialization.tags
        assert len(tags["dagster/data_version"]) == 16, tags  # our content hash, not a logical version
        assert event is not None
    checks = instance.get_event_records(EventRecordsFilter(DagsterEventType.ASSET_CHECK_EVALUATION), limit=1000)
    results = {}
    for record in checks:
        evaluation = record.event_log_entry.dagster_event.event_specific_data
        results.setdefault(evaluation.check_name, []).append(evaluation.passed)
    assert set(results) == {"every_neuron_has_enough_records", "no_silent_zero_simulations", "scores_in_range"}
    assert all(all(v) for v in results.values()), results


@pytest.mark.parametrize("arch", ["gpt2", "llama", "gpt_neox"])
def test_capture_stops_after_the_deepest_requested_layer(arch, tmp_path):
    model_dir = build_tiny_model(arch, tmp_path / "model", n_layers=3)
    subject = SubjectModel(model=str(model_dir), cache=str(tmp_path / "cache"), device="cpu", batch_size=4)
    model, _ = subject.load()
    calls = []
    hooks = [neuron_module(model, layer).register_forward_hook(lambda *a, i=layer: calls.append(i)) for layer in range(3)]
    hooks.append(model.get_output_embeddings().register_forward_hook(lambda *a: calls.append("lm_head")))
    windows = np.random.default_rng(0).integers(0, 100, size=(6, 8))
    batches = list(subject.unit_activations(windows, [0, 1]))
    for h in hooks:
        h.remove()
    assert [start for start, _ in batches] == [0, 4]
    assert batches[0][1][1].shape == (4, 8, subject.shape().n_neurons)
    assert "lm_head" not in calls and 2 not in calls  # layer 2 and the LM head never ran
    assert calls.count(0) == 2  # layer 0's projection ran once per batch


def test_a_neuron_that_never_activates_is_an_error_row(tmp_path):
    """Zeroing one neuron's up projection makes act(gate) * up exactly 0 everywhere."""
    model_dir = build_tiny_model("llama", tmp_path / "model", n_layers=1, max_positions=4096)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[1].zero_()
    model.save_pretrained(model_dir)
    settings = tiny_settings(model_dir, tmp_path, shards=1)
    with in_memory_instance() as instance:
        storage = run_graph(settings, instance, ("00",))
    explanations = storage.read("explanations", "00|00-63")
    dead = explanations.filter(pl.col("unit") == 1)
    assert dead.height == 2 and dead["text"].is_null().all()
    assert all("never activates" in e for e in dead["error"])
    scores = storage.read("scores", "00|00-63").filter(pl.col("unit") == 1)
    assert all(math.isnan(s) for s in scores["score_all"]) and scores["error"].is_not_null().all()
    alive = storage.read("scores", "00|00-63").filter(pl.col("unit") == 0)
    assert alive["error"].is_null().any()  # the rest of the shard completed
    # counted and listed as dead over the whole layer (64 neurons), the one dead neuron only
    assert storage.read("neuron_records", "00", "stats")["activation_frequency"][1] == 0.0
    summary = storage.read("layer_summary", "00")
    assert summary["n_dead_units"].unique().to_list() == [1] and summary["dead_units"][0].to_list() == [1]
    assert summary["n_rare_units"].unique().to_list() == [0]
