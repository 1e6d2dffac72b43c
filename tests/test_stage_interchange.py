"""The interchange stage as plain code, without Dagster: a layer's tables exported to the published
files and imported back, and each way an imported file can be wrong."""

import json

import numpy as np
import polars as pl

from neuron_assets.method.interchange import dumps, simulation_results
from neuron_assets.stages.capture import RECORDS_SCHEMA, STATS_SCHEMA
from neuron_assets.stages.interchange import IMPORT_SETTING, export_neurons, import_explanations

LAYER, T = 2, 4
TEXTS = {5: "the word cat", 9: "closing brackets ]"}


def layer_tables():
    """Scores, simulations, records and stats of neurons 5 and 9 (llm, token_baseline and an llm
    control), and the tokens of their windows: neuron n's top records are windows 0-1, random 2-3."""
    rng = np.random.default_rng(0)
    tokens = {s: [f"t{s}_{i}" for i in range(T)] for s in range(4)}
    scores, sims, records, stats = [], [], [], []
    for neuron, text in TEXTS.items():
        for variant, explanation, score in (("llm", text, 0.5), ("token_baseline", "t0_1", 0.25),
                                            ("llm_shuffled", TEXTS[14 - neuron], 0.0)):
            scores.append({"unit": neuron, "variant": variant, "explanation": explanation, "score_all": score,
                           "rsquared": score / 2, "abs_dev_explained": score / 3})
            sims += [{"unit": neuron, "variant": variant, "kind": kind, "seq_id": s,
                      "expected": rng.uniform(0, 10, T).tolist()} for kind, s in (("random", 2), ("top", 0))]
        for kind, seq_ids in (("top", (0, 1)), ("random", (2, 3))):
            records += [{"unit": neuron, "kind": kind, "rank": rank, "seq_id": s,
                         "activations": rng.standard_normal(T).tolist()} for rank, s in enumerate(seq_ids)]
        stats.append({"unit": neuron, "mean": 0.1, "variance": 1.0, "skewness": 0.0, "kurtosis": 0.0,
                      "max_activation": 3.0, "n_tokens": 16, "quantile_boundaries": [0.5, 1.0]})
    return (pl.DataFrame(scores), pl.DataFrame(sims), pl.DataFrame(records, schema=RECORDS_SCHEMA),
            pl.DataFrame(stats, schema=STATS_SCHEMA), tokens)


def test_export_then_import_gives_back_the_llm_explanations(tmp_path):
    scores, sims, records, stats, tokens = layer_tables()
    written = {}

    def write(relative, text):
        written[relative] = text
        (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / relative).write_text(text)

    exported = export_neurons(LAYER, scores, sims, records, stats, tokens, write)
    assert (exported.neurons, exported.variants) == (2, ["llm", "token_baseline"])  # no control
    assert sorted(written) == [f"{d}/{LAYER}/{n}.json{'l' * (d == 'explanations')}"
                               for d in ("collated-activations", "explanations") for n in (5, 9)]

    results = json.loads(written[f"explanations/{LAYER}/9.jsonl"])
    llm = results["scored_explanations"][0]["scored_simulation"]
    assert llm["ev_correlation_score"] == 0.5 and llm["rsquared_score"] == 0.25
    # the top record's simulation first, each sequence with its own true activations
    sequences = llm["scored_sequence_simulations"]
    top0 = records.filter((pl.col("unit") == 9) & (pl.col("seq_id") == 0))["activations"][0].to_list()
    assert [s["simulation"]["tokens"] for s in sequences] == [tokens[0], tokens[2]]
    np.testing.assert_allclose(sequences[0]["true_activations"], top0)
    record = json.loads(written[f"collated-activations/{LAYER}/9.json"])
    assert [r["tokens"] for r in record["most_positive_activation_records"]] == [tokens[0], tokens[1]]
    assert record["mean"] == 0.1

    imported = import_explanations(str(tmp_path), LAYER, [5, 9], "c1")
    assert [(r["unit"], r["variant"], r["text"], r["error"]) for r in imported.rows] == [
        (5, "imported", TEXTS[5], None), (9, "imported", TEXTS[9], None)]
    assert imported.reported_scores == [0.5, 0.5] and {r["code_version"] for r in imported.rows} == {"c1"}
    # the row records the file's version (as its prompt_version): another file, another version
    (tmp_path / f"explanations/{LAYER}/9.jsonl").write_text(written[f"explanations/{LAYER}/5.jsonl"]
                                                            .replace('"neuron_index": 5', '"neuron_index": 9'))
    again = import_explanations(str(tmp_path), LAYER, [5, 9], "c1")
    assert again.rows[0] == imported.rows[0] and again.rows[1]["prompt_version"] != imported.rows[1]["prompt_version"]
    assert again.rows[1]["text"] == TEXTS[5]


def test_each_bad_file_is_an_error_row_naming_it(tmp_path):
    folder = tmp_path / "explanations" / str(LAYER)
    folder.mkdir(parents=True)
    good = {"explanation": " dogs", "sequences": [], "scores": {"score_all": float("nan"), "rsquared": 0.0,
                                                                "abs_dev_explained": 0.0}}
    (folder / "1.jsonl").write_text("{not json\n")
    (folder / "2.jsonl").write_text(dumps(simulation_results(LAYER, 7, [good])))  # another neuron's file
    (folder / "3.jsonl").write_text(dumps(simulation_results(LAYER, 3, [{**good, "explanation": "  "}])))
    (folder / "4.jsonl").write_text(dumps(simulation_results(LAYER, 4, [])))
    (folder / "5.jsonl").write_text(dumps(simulation_results(LAYER, 5, [good])))
    imported = import_explanations(str(tmp_path), LAYER, [0, 1, 2, 3, 4, 5], "c1")
    errors = {r["unit"]: r["error"] for r in imported.rows}
    assert errors[0] == f"no file {folder / '0.jsonl'}: export it there or change {IMPORT_SETTING}"
    assert errors[1].startswith(f"{folder / '1.jsonl'}: not JSON")
    assert errors[2] == f"{folder / '2.jsonl'}: holds neuron ({LAYER}, 7), expected ({LAYER}, 2)"
    assert errors[3] == f"{folder / '3.jsonl'}: empty explanation"
    assert errors[4] == f"{folder / '4.jsonl'}: no explanation in the file"
    assert errors[5] is None and imported.rows[5]["text"] == "dogs"
    assert all(r["text"] is None for r in imported.rows[:5]) and imported.reported_scores == [None] * 6
    assert imported.rows[0]["prompt_version"] == "" and all(len(r["prompt_version"]) == 16 for r in imported.rows[1:])
