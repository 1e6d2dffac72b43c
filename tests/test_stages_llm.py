"""The LLM stages (explain, simulate, revise) as plain code, without Dagster: a real tiny model in
this process as explainer and simulator, records built here, and the previous rows of a run reused
where a unit's inputs did not change."""

import numpy as np
import polars as pl
import pytest
from tiny_models import build_tiny_model

from neuron_assets.method.prompts import load_fewshot
from neuron_assets.resources.llm import LLM
from neuron_assets.resources.study import PROMPTS
from neuron_assets.stages.explain import SCHEMA, explain_units
from neuron_assets.stages.revise import REVISED_SCHEMA, revise_units
from neuron_assets.stages.simulate import SCHEMA as SIMULATIONS, simulate_units
from neuron_assets.stages import simulate
from neuron_assets.stages.variants import CONTROL_ROWS, explanation_variants

WORDS = ["the", " cat", " sat", " on", " a", " mat", "."]


def quiet(_state) -> None:
    pass


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return build_tiny_model("llama", tmp_path_factory.mktemp("explainer"), n_layers=1, max_positions=4096)


@pytest.fixture(scope="module")
def explainer(model, tmp_path_factory):
    # the response cache on, as the definitions set it (<storage>/llm_cache)
    return LLM(backend="local", model=str(model), device="cpu", cache=str(tmp_path_factory.mktemp("cache")),
               response_cache=str(tmp_path_factory.mktemp("llm_cache")), max_tokens=8)


@pytest.fixture(scope="module")
def explained(explainer):
    """A shard of four units explained once: 3 and 4 by the explainer, 5 never active, 6 short of records."""
    records, tokens = shard({3: 2.0, 4: 1.5, 5: -0.5})
    records[6] = {"top": records[3]["top"][:7], "random": records[3]["random"]}
    result = explain_units(0, [3, 4, 5, 6], records, tokens, None, explainer,
                           load_fewshot(f"{PROMPTS}/explainer_fewshot.json"), "p1", seed=0, code_version="c1",
                           report=quiet)
    return pl.DataFrame(result.rows, schema=SCHEMA).sort("unit", "variant"), records, tokens


def shard(peaks: dict[int, float]):
    """{unit: {kind: [(seq_id, activations)]}} and the tokens of 40 windows: unit u's top records peak
    at peaks[u] on the word 'cat'."""
    tokens = {i: list(WORDS) for i in range(40)}
    records = {}
    for unit, peak in peaks.items():
        top = [(i, np.where(np.arange(7) == 1, peak * (1 - i / 40), 0.0).astype(np.float32)) for i in range(20)]
        random = [(20 + i, np.zeros(7, dtype=np.float32)) for i in range(15)]
        records[unit] = {"top": top, "random": random}
    return records, tokens


def test_explains_units_reuses_unchanged_ones_and_keeps_errors_as_rows(explainer):
    fewshot = load_fewshot(f"{PROMPTS}/explainer_fewshot.json")
    records, tokens = shard({3: 2.0, 4: 1.5, 5: -0.5})
    records[6] = {"top": records[3]["top"][:7], "random": records[3]["random"]}  # too few top records
    first = explain_units(0, [3, 4, 5, 6], records, tokens, None, explainer, fewshot, "p1", seed=0,
                          code_version="c1", report=quiet)
    table = pl.DataFrame(first.rows, schema=SCHEMA).sort("unit", "variant")
    assert table.height == 8 and first.reused == 0 and first.asked == 2  # units 3 and 4 asked
    by = {(r["unit"], r["variant"]): r for r in table.iter_rows(named=True)}
    assert "cat" in by[(3, "token_baseline")]["text"]
    assert by[(5, "llm")]["error"].startswith("neuron never activates") and by[(5, "llm")]["text"] is None
    assert by[(6, "llm")]["error"].startswith("not enough records")
    assert by[(3, "llm")]["inputs_version"] == by[(4, "llm")]["inputs_version"]

    # the same inputs again: nothing asked, identical rows
    again = explain_units(0, [3, 4, 5, 6], records, tokens, table, explainer, fewshot, "p1", seed=0,
                          code_version="c1", report=quiet)
    assert (again.reused, again.asked) == (2, 0)
    assert pl.DataFrame(again.rows, schema=SCHEMA).sort("unit", "variant").equals(table)
    # another seed is another input: every unit is asked again
    reseeded = explain_units(0, [3, 4], records, tokens, table, explainer, fewshot, "p1", seed=1,
                             code_version="c1", report=quiet)
    assert (reseeded.reused, reseeded.asked) == (0, 2)
    # unit 4's records changed: only unit 4 is asked
    records[4]["top"] = [(s, a * 2) for s, a in records[4]["top"]]
    changed = explain_units(0, [3, 4], records, tokens, table, explainer, fewshot, "p1", seed=0,
                            code_version="c1", report=quiet)
    assert (changed.reused, changed.asked) == (1, 1)


def test_simulates_every_variant_and_control_reusing_unchanged_rows(explained, explainer):
    table, records, tokens = explained
    variants = explanation_variants([table], "0|0-9", seed=0, control=True)
    fewshot = load_fewshot(f"{PROMPTS}/simulator_fewshot.json")
    first = simulate_units(variants, records, tokens, None, explainer, fewshot, "s1", report=quiet)
    sims = pl.DataFrame(first.rows, schema=SIMULATIONS)
    ok = variants.filter(pl.col("error").is_null())
    # per explanation that exists: 10 valid sequences (5 top, then 5 random), and 10 of the
    # calibration split except for controls; one error row per other explanation
    n_sequences = 10 * ok.height + 10 * ok.filter(~CONTROL_ROWS).height
    assert sims.filter(pl.col("error").is_null()).height == n_sequences
    assert first.sequences == n_sequences and first.reused == 0
    one = sims.filter((pl.col("unit") == 3) & (pl.col("variant") == "token_baseline"))
    assert one["split"].to_list() == ["valid"] * 10 + ["calibration"] * 10
    assert one["kind"].to_list() == (["top"] * 5 + ["random"] * 5) * 2
    assert all(len(e) == len(WORDS) and 0 <= min(e) and max(e) <= 10 for e in one["expected"])
    control = sims.filter((pl.col("unit") == 3) & (pl.col("variant") == "token_baseline_shuffled"))
    assert control["split"].to_list() == ["valid"] * 10
    failed = sims.filter(pl.col("unit") == 5)
    assert failed["expected"].is_null().all() and failed["error"].str.starts_with("no explanation").all()
    # the controls are simulated with their donor's text under their own explanation id
    assert set(sims["variant"]) >= {"llm", "token_baseline", "llm_shuffled", "token_baseline_shuffled"}

    again = simulate_units(variants, records, tokens, sims, explainer, fewshot, "s1", report=quiet)
    assert (again.reused, again.sequences) == (ok.height, 0)
    assert pl.DataFrame(again.rows, schema=SIMULATIONS).equals(sims)
    recoded = simulate_units(variants, records, tokens, sims, explainer, fewshot, "s2", report=quiet)
    assert (recoded.reused, recoded.sequences) == (0, n_sequences)


def test_batching_explanations_together_gives_the_rows_of_one_at_a_time(explained, model, tmp_path, monkeypatch):
    """Sequences of several explanations share the model's batches; the rows (order, values) are those
    of simulating one explanation at a time, each run on its own empty response cache."""
    table, records, tokens = explained
    variants = explanation_variants([table], "0|0-9", seed=0, control=True)
    fewshot = load_fewshot(f"{PROMPTS}/simulator_fewshot.json")

    def run(per_call: int, name: str) -> pl.DataFrame:
        monkeypatch.setattr(simulate, "EXPLANATIONS_PER_CALL", per_call)
        llm = LLM(backend="local", model=str(model), device="cpu", cache=str(tmp_path / "models"),
                  response_cache=str(tmp_path / name))
        result = simulate_units(variants, records, tokens, None, llm, fewshot, "s1", report=quiet)
        assert result.cache_hits < result.sequences  # computed here, not read back
        return pl.DataFrame(result.rows, schema=SIMULATIONS)

    together, alone = run(8, "together"), run(1, "alone")
    assert together.drop("expected").equals(alone.drop("expected"))
    for a, b in zip(together["expected"], alone["expected"]):
        assert (a is None) == (b is None)
        if a is not None:
            np.testing.assert_allclose(a.to_numpy(), b.to_numpy(), atol=1e-4)


def test_an_unusable_simulator_is_an_error_row_per_explanation_not_a_failed_shard(explained, tmp_path):
    table, records, tokens = explained
    missing = LLM(backend="local", model=str(tmp_path / "no-such-model"), device="cpu", cache=str(tmp_path))
    result = simulate_units(table, records, tokens, None, missing, [], "s1", report=quiet)
    rows = pl.DataFrame(result.rows, schema=SIMULATIONS)
    assert rows.height == table.height and rows["expected"].is_null().all()
    ok = rows.join(table.filter(pl.col("error").is_null()), on=["unit", "variant"], how="semi")
    assert ok.height == 4 and ok["error"].str.starts_with("simulator unusable").all()  # units 3, 4: two variants


def test_revises_llm_explanations_and_reuses_unchanged_revisions(explained, explainer):
    table, records, tokens = explained
    first = table.filter(pl.col("variant") == "llm")
    fewshot = load_fewshot(f"{PROMPTS}/simulator_fewshot.json")

    def revise(previous, seed=0):
        return revise_units(0, first, records, tokens, previous, explainer, explainer, fewshot, "r1", seed=seed,
                            code_version="c1", report=quiet)

    result = revise(None)
    rows = pl.DataFrame(result.rows, schema=REVISED_SCHEMA).sort("unit")
    assert rows["unit"].to_list() == [3, 4, 5, 6] and set(rows["variant"]) == {"revised"}
    assert rows["revised_from"].to_list() == first.sort("unit")["explanation_id"].to_list()
    done = rows.filter(pl.col("error").is_null())
    assert done["unit"].to_list() == [3, 4] and result.revised + result.kept == 2
    assert rows.filter(pl.col("unit") == 5)["error"][0].startswith("no llm explanation to revise")
    # every revision of a mispredicted explanation saw at least one miss or false alarm
    assert ((done["misses"] + done["false_alarms"] > 0) | (done["text"] == first.sort("unit")["text"][:2])).all()
    assert (done["tokens_in"] > 0).all()  # the simulations of the held-out records are counted

    again = revise(rows)
    assert (again.reused, again.revised, again.kept) == (2, 0, 0)
    assert pl.DataFrame(again.rows, schema=REVISED_SCHEMA).sort("unit").equals(rows)
    assert revise(rows, seed=1).reused == 0
