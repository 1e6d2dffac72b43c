"""The explain stage as plain code, without Dagster: a real tiny explainer in this process, records
built here, and the previous rows of a run reused where a unit's inputs did not change."""

import numpy as np
import polars as pl
import pytest
from tiny_models import build_tiny_model

from neuron_assets.method.prompts import load_fewshot
from neuron_assets.resources.llm import LLM
from neuron_assets.resources.study import PROMPTS
from neuron_assets.stages.explain import SCHEMA, explain_units

WORDS = ["the", " cat", " sat", " on", " a", " mat", "."]


@pytest.fixture(scope="module")
def explainer(tmp_path_factory):
    model = build_tiny_model("llama", tmp_path_factory.mktemp("explainer"), n_layers=1, max_positions=4096)
    return LLM(backend="local", model=str(model), device="cpu", cache=str(tmp_path_factory.mktemp("cache")),
               max_tokens=8)


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
                          code_version="c1", log=lambda _: None)
    table = pl.DataFrame(first.rows, schema=SCHEMA).sort("neuron", "variant")
    assert table.height == 8 and first.reused == 0 and first.asked == 2  # units 3 and 4 asked
    by = {(r["neuron"], r["variant"]): r for r in table.iter_rows(named=True)}
    assert "cat" in by[(3, "token_baseline")]["text"]
    assert by[(5, "llm")]["error"].startswith("neuron never activates") and by[(5, "llm")]["text"] is None
    assert by[(6, "llm")]["error"].startswith("not enough records")
    assert by[(3, "llm")]["inputs_version"] == by[(4, "llm")]["inputs_version"]

    # the same inputs again: nothing asked, identical rows
    again = explain_units(0, [3, 4, 5, 6], records, tokens, table, explainer, fewshot, "p1", seed=0,
                          code_version="c1", log=lambda _: None)
    assert (again.reused, again.asked) == (2, 0)
    assert pl.DataFrame(again.rows, schema=SCHEMA).sort("neuron", "variant").equals(table)
    # another seed is another input: every unit is asked again
    reseeded = explain_units(0, [3, 4], records, tokens, table, explainer, fewshot, "p1", seed=1,
                             code_version="c1", log=lambda _: None)
    assert (reseeded.reused, reseeded.asked) == (0, 2)
    # unit 4's records changed: only unit 4 is asked
    records[4]["top"] = [(s, a * 2) for s, a in records[4]["top"]]
    changed = explain_units(0, [3, 4], records, tokens, table, explainer, fewshot, "p1", seed=0,
                            code_version="c1", log=lambda _: None)
    assert (changed.reused, changed.asked) == (1, 1)
