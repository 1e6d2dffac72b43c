"""The capture stage as plain code, without Dagster: a tiny random-weight GPT-2 run over a few
windows, its tables checked against the activations computed here directly."""

import numpy as np
import polars as pl
import pytest
from tiny_models import build_tiny_model

from neuron_assets.method.records import HARD_FRACTION
from neuron_assets.resources.subject_model import SubjectModel
from neuron_assets.stages.capture import RECORDS_SCHEMA, STATS_SCHEMA, capture_records

N_WINDOWS, SEQ_LEN, N_TOP, N_RANDOM = 48, 12, 20, 15


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """The model, its windows (drawn from 30 token ids, so top tokens recur in other windows), each
    layer's activations [W, T, N] computed here, and the stage's result for layers 0 and 1."""
    tmp = tmp_path_factory.mktemp("capture")
    model = SubjectModel(model=str(build_tiny_model("gpt2", tmp / "model", n_layers=2)), cache=str(tmp / "cache"),
                         device="cpu", batch_size=8)
    token_ids = np.random.default_rng(0).integers(10, 40, size=(N_WINDOWS, SEQ_LEN))
    direct = {layer: np.concatenate([acts[layer] for _, acts in model.unit_activations(token_ids, [0, 1])])
              for layer in (0, 1)}
    states = []
    captured = capture_records(model, token_ids, [0, 1], N_TOP, N_RANDOM, seed=3, report=states.append,
                               what="layers 0..1")
    return model, token_ids, direct, captured, states


def test_top_records_and_stats_are_those_of_the_activations(run):
    _, token_ids, direct, captured, states = run
    assert list(captured.layers) == [0, 1]
    assert (captured.n_windows, captured.n_tokens) == (N_WINDOWS, token_ids.size)
    for layer, acts in direct.items():
        tables = captured.layers[layer]
        assert tables.records.schema == pl.Schema(RECORDS_SCHEMA) and tables.stats.schema == pl.Schema(STATS_SCHEMA)
        n_neurons = acts.shape[2]
        np.testing.assert_allclose(tables.stats["max_activation"].to_numpy(), acts.max(axis=(0, 1)), rtol=1e-6)
        # 48 windows, fewer than the pool of 50 it is counted on: the share of every token, exactly
        peak = tables.stats["max_activation"].to_numpy()
        shown = ((acts >= HARD_FRACTION * peak) & (peak > 0)).mean(axis=(0, 1))
        assert tables.stats["active_share"].to_list() == shown.tolist() and 0 < shown.min() < shown.max() < 1
        top = tables.records.filter(pl.col("kind") == "top").sort("unit", "rank")
        assert top.height == n_neurons * N_TOP
        for neuron, rows in top.group_by("unit", maintain_order=True):
            window_max = acts[:, :, neuron[0]].max(axis=1)
            expected = np.lexsort((np.arange(N_WINDOWS), -window_max))[:N_TOP]  # max desc, seq_id asc
            assert rows["seq_id"].to_list() == expected.tolist()
            np.testing.assert_array_equal(np.stack(rows["activations"].to_numpy()), acts[expected, :, neuron[0]])
        assert tables.short_neurons() == {"top": 0, "random": 0}
    assert [(s.what, s.total) for s in states if s.final][0] == ("forward pass, layers 0..1", N_WINDOWS)


def test_hard_negatives_hold_a_top_token_and_stay_quiet(run):
    _, token_ids, direct, captured, states = run
    found = 0
    for layer, acts in direct.items():
        records = captured.layers[layer].records
        hard = records.filter(pl.col("kind") == "hard_negative")
        found += hard.height
        assert captured.layers[layer].hard_per_neuron.sum() == hard.height
        for (neuron,), rows in hard.group_by("unit"):
            top = records.filter((pl.col("unit") == neuron) & (pl.col("kind") == "top"))
            peak = acts[top["seq_id"].to_numpy(), :, neuron].max()
            windows = rows["seq_id"].to_numpy()
            assert not set(windows) & set(top["seq_id"].to_list())
            assert (acts[windows, :, neuron].max(axis=1) < HARD_FRACTION * peak).all()
            np.testing.assert_array_equal(np.stack(rows["activations"].to_numpy()), acts[windows, :, neuron])
    assert found > 0 and 0 < captured.second_pass_windows <= N_WINDOWS
    assert any(s.what == "second pass (hard_negative), layers 0..1" and s.final for s in states)


def test_a_layer_alone_gets_the_same_tables_as_beside_another(run):
    model, token_ids, _, captured, _ = run
    alone = capture_records(model, token_ids, [1], N_TOP, N_RANDOM, seed=3, report=lambda _: None)
    assert alone.layers[1].records.equals(captured.layers[1].records)
    assert alone.layers[1].stats.equals(captured.layers[1].stats)
    reseeded = capture_records(model, token_ids, [1], N_TOP, N_RANDOM, seed=4, report=lambda _: None)
    random = pl.col("kind") == "random"
    assert not reseeded.layers[1].records.filter(random).equals(captured.layers[1].records.filter(random))


def test_sampling_where_the_model_runs_gives_the_same_tables(run):
    """The first pass sampled by `DeviceRecordSampler` (what a CUDA model gets; here on CPU tensors)."""
    model, token_ids, _, captured, _ = run
    on_device = capture_records(model, token_ids, [0, 1], N_TOP, N_RANDOM, seed=3, report=lambda _: None,
                                on_device=True)
    for layer, tables in captured.layers.items():
        assert on_device.layers[layer].records.equals(tables.records)
        np.testing.assert_array_equal(on_device.layers[layer].hard_per_neuron, tables.hard_per_neuron)
        for column in ("mean", "variance", "skewness", "kurtosis"):
            np.testing.assert_allclose(on_device.layers[layer].stats[column].to_numpy(),
                                       tables.stats[column].to_numpy(), rtol=1e-4, atol=1e-6)
        exact = tables.stats.drop("mean", "variance", "skewness", "kurtosis")
        assert on_device.layers[layer].stats.drop("mean", "variance", "skewness", "kurtosis").equals(exact)
