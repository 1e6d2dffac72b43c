"""'top:N:<statistic>': the N neurons of a shard ranked first by a statistic of neuron_records' stats
table, hand-ranked on a small table; the active share the sparsity ranking reads, on hand-made
activations; a change of selection that keeps the explanations of the neurons in both."""

import math

import numpy as np
import polars as pl
import pytest
from tiny_models import build_tiny_model

from neuron_assets.method.prompts import load_fewshot, normalized_values
from neuron_assets.method.records import RecordSampler
from neuron_assets.method.selection import dead_and_rare, top_neurons
from neuron_assets.resources.llm import LLM
from neuron_assets.resources.study import PROMPTS, Study
from neuron_assets.settings import check_neurons
from neuron_assets.stages.capture import STATS_SCHEMA
from neuron_assets.stages.explain import SCHEMA, explain_units, rare_reasons

NAN = math.nan
# a layer of 12 neurons; the shard is 4-11 (neurons 0-3 outrank every other and must not count)
STATS = pl.DataFrame({
    "unit": list(range(12)),
    "max_activation": [99.0, 99.0, 99.0, 99.0, 2.0, 8.0, 0.0, 8.0, 3.0, -1.0, 5.0, 1.0],
    "kurtosis": [99.0, 99.0, 99.0, 99.0, 5.0, 1.0, 50.0, 9.0, NAN, 7.0, 9.0, -1.0],
    "active_share": [0.0, 0.0, 0.0, 0.0, 0.10, 0.50, 0.0, 0.02, 0.02, 0.0, 0.30, 0.90],
})
SHARD = range(4, 12)
# by hand: 6 (max 0) and 9 (max -1) are dead, last for every statistic; 8's kurtosis is NaN
RANKED = {
    "max": [5, 7, 10, 8, 4, 11, 6, 9],  # 5 and 7 tie at 8.0: the lower index first
    "kurtosis": [7, 10, 4, 5, 11, 6, 8, 9],  # 7 and 10 tie at 9.0; 6 (dead, 50.0) and 8 (NaN) last
    "sparsity": [7, 8, 4, 10, 5, 11, 6, 9],  # lowest share first; 7 and 8 tie at 0.02; 6 has 0.0 but is dead
}
COLUMN = {"max": ("max_activation", True), "kurtosis": ("kurtosis", True), "sparsity": ("active_share", False)}


@pytest.mark.parametrize("ranking", RANKED)
def test_the_ranking_by_each_statistic_is_the_hand_computed_one(ranking):
    shard = STATS.filter(pl.col("unit").is_in(list(SHARD)))
    column, highest_first = COLUMN[ranking]
    assert top_neurons(shard["unit"].to_list(), shard[column].to_list(), shard["max_activation"].to_list(), 8,
                       highest_first) == RANKED[ranking]
    for n in (1, 3, 6, 8, 50):  # the shard's selection: the first n of the ranking, ascending
        assert Study(neurons=f"top:{n}:{ranking}").selected(SHARD, STATS) == sorted(RANKED[ranking][:n])


def test_a_null_statistic_or_max_ranks_last():
    assert top_neurons([0, 1, 2, 3], [None, 1.0, 2.0, 3.0], [1.0, 1.0, None, NAN], 4, True) == [1, 0, 2, 3]


def test_the_other_selections_need_no_stats_and_a_ranking_needs_them():
    assert Study(neurons="first:3").selected(SHARD, None) == [4, 5, 6]
    assert Study(neurons="list:2,5,9").selected(SHARD, STATS) == [5, 9]
    with pytest.raises(ValueError, match="ranks the neurons by their stats: materialize neuron_records"):
        Study(neurons="top:3:max").selected(SHARD, None)
    with pytest.raises(ValueError, match="ranks by active_share, which these neuron_records stats lack"):
        Study(neurons="top:3:sparsity").selected(SHARD, STATS.drop("active_share"))
    check_neurons("top:5000:kurtosis", 64)  # more than a shard holds: the whole shard


def test_active_share_is_the_share_of_tokens_shown_as_1_or_more():
    """Three windows of four tokens, fewer than the pool: the share is exact. Neuron 0 peaks at 10, so
    1.0 (exactly 10%) counts and 0.99 does not; neuron 1 never activates; neuron 2 is constant."""
    windows = np.zeros((3, 4, 3), np.float32)
    windows[:, :, 0] = [[0, 1, 0.5, 10], [0.99, 0, 0, 0], [2, 0, 0, 0]]
    windows[:, :, 1] = -0.5
    windows[:, :, 2] = 3.0
    sampler = RecordSampler(3, 4, n_top=2, n_random=2, quantile_pool=4, n_maxima=8)
    sampler.update(windows, np.arange(3))
    stats = sampler.finalize()[1]
    assert stats["active_share"] == [3 / 12, 0.0, 1.0]
    shown = np.array(normalized_values(list(windows[:, :, 0])))  # the explainer's 0-10 values
    assert (shown >= 1).mean() == stats["active_share"][0]
    assert set(stats) == set(STATS_SCHEMA)


def test_active_share_is_counted_on_the_random_windows_when_the_corpus_has_more():
    rng = np.random.default_rng(0)
    acts = (rng.standard_normal((30, 6, 4)) ** 3).astype(np.float32)
    sampler = RecordSampler(4, 6, n_top=2, n_random=5, quantile_pool=5, n_maxima=8, seed=1)
    for start in range(0, 30, 7):
        sampler.update(acts[start : start + 7], np.arange(start, min(start + 7, 30)))
    records, stats = sampler.finalize()
    peak = acts.max(axis=(0, 1))
    for neuron in range(4):
        rows = (records["unit"] == neuron) & (records["kind"] == "random")  # here the whole pool
        assert rows.sum() == 5
        assert stats["active_share"][neuron] == (records["activations"][rows] >= 0.1 * peak[neuron]).mean()
    assert stats["active_share"] != [(acts[:, :, n] >= 0.1 * peak[n]).mean() for n in range(4)]  # an estimate


@pytest.fixture(scope="module")
def explainer(tmp_path_factory):
    model = build_tiny_model("llama", tmp_path_factory.mktemp("explainer"), n_layers=1, max_positions=4096)
    return LLM(backend="local", model=str(model), device="cpu", cache=str(tmp_path_factory.mktemp("cache")),
               response_cache=str(tmp_path_factory.mktemp("llm_cache")), max_tokens=8)


def test_first_3_to_top_3_kurtosis_reuses_the_neurons_in_both_and_keeps_the_others(explainer):
    """Neurons 0-5, each with records peaking on ' cat'; first:3 explains 0, 1, 2; top:3:kurtosis
    selects 1, 2, 4: 1 and 2 are reused, 4 is asked, 0 is kept (valid, outside the selection)."""
    words = ["the", " cat", " sat", " on", " a", " mat", "."]
    tokens = {i: list(words) for i in range(40)}
    records = {unit: {"top": [(i, np.where(np.arange(7) == 1, (1 + unit) * (1 - i / 40), 0.0).astype(np.float32))
                              for i in range(20)],
                      "random": [(20 + i, np.zeros(7, np.float32)) for i in range(15)]} for unit in range(6)}
    stats = pl.DataFrame({"unit": list(range(6)), "max_activation": [1.0 + u for u in range(6)],
                          "kurtosis": [0.5, 4.0, 3.0, 1.0, 2.0, 1.5]})
    fewshot = load_fewshot(f"{PROMPTS}/explainer_fewshot.json")

    def explain(spec, previous):
        units = Study(neurons=spec).selected(range(6), stats)
        return units, explain_units(0, units, records, tokens, previous, explainer, fewshot, "p1", seed=0,
                                    code_version="c1", report=lambda _: None)

    units, first = explain("first:3", None)
    assert units == [0, 1, 2] and first.asked == 3
    table = pl.DataFrame(first.rows, schema=SCHEMA)
    units, ranked = explain("top:3:kurtosis", table)
    assert units == [1, 2, 4]
    assert (ranked.reused, ranked.asked, ranked.kept) == (3, 1, 1)  # reused: 1, 2 and the kept 0
    rows = pl.DataFrame(ranked.rows, schema=SCHEMA).filter(pl.col("variant") == "llm").sort("unit")
    assert rows["unit"].to_list() == [0, 1, 2, 4]
    assert rows.filter(pl.col("unit") < 3).equals(table.filter(pl.col("variant") == "llm").sort("unit"))


def test_dead_units_never_fire_and_rare_ones_fire_on_fewer_tokens_than_the_threshold():
    neurons = [7, 3, 5, 9, 4, 8]
    frequencies = [0.0, 2e-6, 1e-5, float("nan"), 0.3, 9.99e-6]
    assert dead_and_rare(neurons, frequencies, 1e-5) == ([7], [3, 8])  # 1e-5 itself is not under 1e-5
    assert dead_and_rare(neurons, frequencies, 0.0) == ([7], [])  # only dead ones: nothing is under 0
    assert dead_and_rare(neurons, frequencies, 0.5) == ([7], [3, 4, 5, 8])  # NaN (no tokens): neither
    stats = pl.DataFrame({"unit": neurons, "activation_frequency": frequencies})
    assert Study(min_activation_frequency=1e-5).dead_and_rare(stats) == ([7], [3, 8])
    with pytest.raises(ValueError, match="lack activation_frequency: materialize neuron_records"):
        Study().dead_and_rare(stats.drop("activation_frequency"))


def test_a_rare_unit_gets_a_row_saying_why_and_no_llm_work(explainer):
    words = ["the", " cat", " sat", " on", " a", " mat", "."]
    tokens = {i: list(words) for i in range(40)}
    records = {unit: {"top": [(i, np.where(np.arange(7) == 1, 2.0 * (1 - i / 40), 0.0).astype(np.float32))
                              for i in range(20)],
                      "random": [(20 + i, np.zeros(7, np.float32)) for i in range(15)]} for unit in range(3)}
    stats = pl.DataFrame({"unit": [0, 1, 2], "activation_frequency": [0.2, 3e-6, 0.0]})
    study = Study(min_activation_frequency=1e-5)
    dead, rare = study.dead_and_rare(stats)
    assert (dead, rare) == ([2], [1])
    reasons = rare_reasons(stats, rare, study.min_activation_frequency)
    assert reasons == {1: "rare unit: above 0 on 3e-06 of the corpus's tokens, under "
                          "NEURON_ASSETS_MIN_ACTIVATION_FREQUENCY=1e-05; not explained"}
    fewshot = load_fewshot(f"{PROMPTS}/explainer_fewshot.json")
    result = explain_units(0, [0, 1], records, tokens, None, explainer, fewshot, "p1", seed=0, code_version="c1",
                           report=lambda _: None, rare=reasons)
    assert result.asked == 1  # unit 0 only
    rows = pl.DataFrame(result.rows, schema=SCHEMA).sort("unit", "variant")
    skipped = rows.filter(pl.col("unit") == 1)
    assert skipped["variant"].to_list() == ["llm", "token_baseline"]
    assert skipped["text"].is_null().all() and skipped["error"].to_list() == [reasons[1]] * 2
    assert rows.filter(pl.col("unit") == 0)["error"].is_null().all()
