"""The token explorer: the pure selection of the most active explained neurons per token, the
subject model's activations for a text, and `neuron-assets explore` on a materialized tiny run (a
subject model whose layer-0 neurons fire on known words, the rule-based oracle as explainer and
simulator behind a real OpenAI-compatible server)."""

import ast
from dataclasses import replace

import numpy as np
import polars as pl
import pytest
from oracle_server import OracleServer
from pipeline import in_memory_instance, remote, run_graph, tiny_settings
from tiny_models import build_token_neuron_model

from neuron_assets import cli
from neuron_assets.explorer import explained_neurons, run_text, top_explained
from neuron_assets.resources.subject_model import SubjectModel

# neuron 0 fires on "the", neuron 1 on "is", neuron 2 fully on "to" and half as strongly on "the"
WORDS = [" the", " is", " to| the"]
TEXT = "it is the end, to be sure"  # tiny tokenizer: "it", " is", " the", " e", "nd", ",", " to", ...


def table(rows: list[tuple]) -> pl.DataFrame:
    return pl.DataFrame(rows, schema={"layer": pl.Int32, "unit": pl.Int32, "variant": pl.String,
                                      "explanation": pl.String, "score_all": pl.Float64}, orient="row")


def test_explained_neurons_keep_the_best_real_variant():
    scores = table([
        (0, 1, "llm", "llm one", 0.4), (0, 1, "token_baseline", "baseline one", 0.7),
        (0, 1, "llm_shuffled", "someone else's", 0.9),  # a control never stands for a neuron
        (0, 2, "llm", "llm two", float("nan")), (0, 2, "revised", "revised two", 0.2),
        (0, 3, "llm", "llm three", float("nan")), (0, 3, "token_baseline", "baseline three", float("nan")),
        (0, 4, "llm", None, 0.9), (1, 1, "llm", "layer one", 0.5),
    ])
    stats = pl.DataFrame({"layer": [0, 0], "unit": [1, 2], "max_activation": [2.0, 4.0]})
    out = explained_neurons(scores, stats)
    assert out.select("layer", "unit", "variant", "explanation").rows() == [
        (0, 1, "token_baseline", "baseline one"), (0, 2, "revised", "revised two"), (0, 3, "llm", "llm three"),
        (1, 1, "llm", "layer one")]  # NaN after finite scores, llm first among ties; no explanation: left out
    assert out["max_activation"].to_list() == [2.0, 4.0, None, None]


def test_top_explained_ranks_relative_activations_per_layer():
    explained = table([(0, 0, "llm", "zero", 0.9), (0, 2, "llm", "two", 0.8), (0, 3, "llm", "three", 0.1),
                       (1, 1, "llm", "one", 0.5)]).with_columns(max_activation=pl.Series([10.0, 1.0, None, 2.0]))
    layer0 = np.array([[5.0, 99.0, 0.9, 0.0],     # neuron 1 is not explained: never shown
                       [-1.0, 0.0, -0.5, -2.0],   # nothing active
                       [10.0, 0.0, 1.0, 0.5]])    # 0 and 2 both at their max: tie, lower neuron first
    layer1 = np.array([[0.0, 1.0], [0.0, 0.0], [0.0, 4.0]])
    hits = top_explained({0: layer0, 1: layer1}, explained, top=2)
    assert [[(h["layer"], h["unit"]) for h in token] for token in hits] == [
        [(0, 2), (0, 0), (1, 1)], [], [(0, 0), (0, 2), (1, 1)]]
    assert hits[0][0]["relative"] == pytest.approx(0.9) and hits[0][0]["explanation"] == "two"
    assert hits[0][1]["activation"] == 5.0 and hits[0][1]["relative"] == pytest.approx(0.5)
    assert [h["unit"] for h in top_explained({0: layer0}, explained, top=1)[2]] == [0]
    # an unknown max_activation ranks the raw activation
    assert [h["unit"] for h in top_explained({0: np.array([[0.0, 0.0, 0.0, 0.7]])}, explained)[0]] == [3]
    assert top_explained({0: layer0}, explained, min_activation=6.0)[2][0]["unit"] == 0
    with pytest.raises(ValueError, match="top must be at least 1"):
        top_explained({0: layer0}, explained, top=0)


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("explorer")
    model, _ = build_token_neuron_model(tmp / "model", WORDS, n_layers=1)
    with OracleServer() as server:
        settings = replace(remote(tiny_settings(model, tmp, neurons="first:3", shards=1), server),
                           simulation_method="json")
        with in_memory_instance() as instance:
            run_graph(settings, instance, ("00",))
    return settings


def test_the_neurons_that_fire_on_a_word_are_picked(study):
    subject = SubjectModel(model=study.model, cache=study.cache, device="cpu")
    tokens, acts = run_text(subject, TEXT, [0])
    assert acts[0].shape[0] == len(tokens) and "".join(tokens) == TEXT
    explained = table([(0, 0, "llm", "the", 1.0), (0, 1, "llm", "is", 1.0), (0, 2, "llm", "to, the", 1.0)]
                      ).with_columns(max_activation=pl.lit(float(acts[0][:, :3].max())))
    hits = top_explained(acts, explained, top=3)
    picked = {t: [h["unit"] for h in found] for t, found in zip(tokens, hits)}
    assert picked[" the"] == [0, 2]  # neuron 2 half as strongly
    assert picked[" is"] == [1] and picked[" to"] == [2]
    assert picked["it"] == [] and picked[" be"] == []
    assert [h["unit"] for h in top_explained(acts, explained, top=1)[tokens.index(" the")]] == [0]


def explore(monkeypatch, capsys, settings, *args) -> str:
    for name, value in settings.environment().items():
        monkeypatch.setenv(name, value)
    cli.main(["explore", *args])
    return capsys.readouterr().out


def hits_of(out: str) -> dict[str, list[str]]:
    """{token shown: [hit lines]} from the CLI's output."""
    found, token = {}, None
    for line in out.splitlines()[1:]:
        if line.startswith("        "):
            found[token].append(line.strip())
        else:
            token = ast.literal_eval(line.split(None, 1)[1].removesuffix("  -"))  # the token's repr
            found[token] = []
    return found


def test_cli_explore_prints_the_neuron_of_each_word(study, monkeypatch, capsys):
    out = explore(monkeypatch, capsys, study, TEXT)
    assert out.splitlines()[0].startswith("10 tokens; explained units: 3 in layer(s) 00 (mlp)")
    found = hits_of(out)
    assert [h.split()[:4] for h in found[" the"]] == [["layer", "00", "unit", "0"], ["layer", "00", "unit", "2"]]
    assert found[" the"][0].endswith('the token "the"') and "score_all  1.000" in found[" the"][0]
    assert [h.split()[3] for h in found[" is"]] == ["1"] and [h.split()[3] for h in found[" to"]] == ["2"]
    assert found["it"] == [] and found[" be"] == []
    found = hits_of(explore(monkeypatch, capsys, study, TEXT, "--top", "1", "--layers", "0"))
    assert [h.split()[3] for h in found[" the"]] == ["0"]


def test_cli_explore_without_scores_says_what_to_run(study, monkeypatch, capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_:
        explore(monkeypatch, capsys, replace(study, storage=str(tmp_path / "empty")), TEXT)
    assert "no explained units in scores" in str(exit_.value) and "neuron-assets demo" in str(exit_.value)
    with pytest.raises(SystemExit) as exit_:  # a usage error, as the demo's: exit status 2, said on stderr
        explore(monkeypatch, capsys, study, TEXT, "--layers", "7")
    assert exit_.value.code == 2 and "--layers 7: not among the layers in force" in capsys.readouterr().err
