import json
import math

import numpy as np
import pytest

from neuron_assets.method import interchange
from neuron_assets.method.scoring import absolute_dev_explained, correlation, rsquared

ODD_TOKENS = ["a\tb", "line\nbreak", 'say "hi"', "<script>alert(1)</script>", "🙂", "\u2028", "back\\slash", "é"]


def strict_loads(text):
    """json.loads that refuses NaN, Infinity and -Infinity."""

    def refuse(name):
        raise ValueError(f"non-strict JSON constant {name}")

    return json.loads(text, parse_constant=refuse)


def record(rng, tokens):
    return tokens, rng.standard_normal(len(tokens)).astype(np.float32)


def example_records(rng):
    top = [record(rng, ODD_TOKENS), record(rng, ["x", " y", "z"])]
    random = [record(rng, ["r", "s"])]
    quantiles = [[record(rng, ["q0"])], [], [record(rng, ["q2", "q2b"]), record(rng, ["q2c"])]]
    stats = {
        "mean": 0.123456789,
        "variance": 2.5,
        "skewness": float("nan"),
        "kurtosis": -1.25,
        "max_activation": 9.0,
        "quantile_boundaries": [0.1, 0.37, float(np.float32(1.7)), 4.000000001],
    }
    return top, random, quantiles, stats


def test_file_paths_are_unpadded():
    assert interchange.file_paths(0, 5) == ("collated-activations/0/5.json", "explanations/0/5.jsonl")
    assert interchange.file_paths(np.int64(12), 1023) == (
        "collated-activations/12/1023.json",
        "explanations/12/1023.jsonl",
    )


def test_neuron_record_round_trip_is_exact():
    top, random, quantiles, stats = example_records(np.random.default_rng(0))
    obj = interchange.neuron_record(3, 17, top, random, quantiles, stats)
    text = interchange.dumps(obj)
    assert "\n" not in text and text.isascii()
    raw = strict_loads(text)
    assert raw["dataclass_name"] == "NeuronRecord"
    assert raw["neuron_id"] == {"dataclass_name": "NeuronId", "layer_index": 3, "neuron_index": 17}
    assert raw["most_positive_activation_records"][0]["dataclass_name"] == "ActivationRecord"
    assert raw["skewness"] is None  # NaN written as null
    assert "max_activation" not in raw

    for field, rows in (("most_positive_activation_records", top), ("random_sample", random)):
        assert [r["tokens"] for r in raw[field]] == [t for t, _ in rows]
        for got, (_, want) in zip(raw[field], rows):  # float32 values written exactly
            np.testing.assert_array_equal(np.asarray(got["activations"], np.float32), want)
    assert [len(b) for b in raw["random_sample_by_quantile"]] == [1, 0, 2]
    assert raw["mean"] == 0.123456789 and raw["variance"] == 2.5 and raw["kurtosis"] == -1.25
    assert raw["quantile_boundaries"] == stats["quantile_boundaries"]


def test_odd_tokens_survive_unchanged():
    tokens, acts = record(np.random.default_rng(1), ODD_TOKENS)
    text = interchange.dumps(interchange.neuron_record(0, 0, [(tokens, acts)], [], [], example_records(np.random.default_rng(0))[3]))
    assert len(text.splitlines()) == 1  # even U+2028 is escaped
    assert strict_loads(text)["most_positive_activation_records"][0]["tokens"] == ODD_TOKENS
    # the simulation file too, read as JSON lines after a blank line
    sequences = [{"tokens": ODD_TOKENS, "expected": np.arange(8, dtype=np.float32), "true": acts}]
    scores = {"score_all": 0.5, "rsquared": 0.1, "abs_dev_explained": 0.2}
    results = interchange.simulation_results(0, 0, [{"explanation": "tabs\tand <b>", "sequences": sequences, "scores": scores}])
    text = "\n" + interchange.dumps(results) + "\n"
    raw = strict_loads(text)
    assert raw["scored_explanations"][0]["scored_simulation"]["scored_sequence_simulations"][0]["simulation"]["tokens"] == ODD_TOKENS
    assert interchange.read_explanations(text, "e.jsonl")[0]["explanation"] == "tabs\tand <b>"


def scored_example(rng):
    """Two explanations over three sequences each; the second has a failed token and a constant
    simulation of the first sequence."""
    true = [rng.standard_normal(n).astype(np.float32) for n in (5, 4, 6)]
    tokens = [[f"t{i}_{j}" for j in range(len(t))] for i, t in enumerate(true)]
    first = [(t + rng.standard_normal(len(t))).astype(np.float32) for t in true]
    second = [np.full(5, 2.0, np.float32), rng.uniform(0, 10, 4).astype(np.float32), rng.uniform(0, 10, 6).astype(np.float32)]
    second[2][3] = np.nan
    out = []
    for explanation, expected in (("years in dates", first), ("  the main thing this neuron does is find nothing.", second)):
        out.append(
            {
                "explanation": explanation,
                "sequences": [{"tokens": k, "expected": e, "true": t} for k, e, t in zip(tokens, expected, true)],
                "scores": {
                    "score_all": correlation(true, expected),
                    "rsquared": rsquared(true, expected),
                    "abs_dev_explained": absolute_dev_explained(true, expected),
                },
            }
        )
    return out


def test_simulation_results_scores_match_exported_sequences():
    scored = scored_example(np.random.default_rng(2))
    scored[1]["scores"]["rsquared"] = float("nan")
    text = interchange.dumps(interchange.simulation_results(4, 9, scored))
    assert "NaN" not in text and "\n" not in text
    raw = strict_loads(text)
    assert raw["dataclass_name"] == "NeuronSimulationResults"
    assert raw["neuron_id"] == {"dataclass_name": "NeuronId", "layer_index": 4, "neuron_index": 9}
    for item, given in zip(raw["scored_explanations"], scored):
        sim = item["scored_simulation"]
        sequences = sim["scored_sequence_simulations"]
        expected = [np.array(s["simulation"]["expected_activations"]) for s in sequences]  # numbers only
        true = [np.array(s["true_activations"]) for s in sequences]
        assert sim["ev_correlation_score"] == pytest.approx(correlation(true, expected), abs=1e-12)
        assert sim["ev_correlation_score"] == pytest.approx(given["scores"]["score_all"], abs=1e-12)
        for s, e, t, g in zip(sequences, expected, true, given["sequences"]):
            np.testing.assert_array_equal(np.array(s["true_activations"], np.float32), g["true"])
            np.testing.assert_array_equal(e.astype(np.float32), np.where(np.isnan(g["expected"]), 0, g["expected"]))
            assert s["simulation"]["activation_scale"] == "simulated_normalized_activations"
            assert s["simulation"]["distribution_values"] == [[]] * len(e)
            assert s["simulation"]["distribution_probabilities"] == [[]] * len(e)
            for key, fn in (("ev_correlation_score", correlation), ("rsquared_score", rsquared)):
                want = fn([t], [e])
                assert (s[key] is None) if math.isnan(want) else s[key] == pytest.approx(want, abs=1e-12)
    second = raw["scored_explanations"][1]["scored_simulation"]
    assert second["rsquared_score"] is None
    assert second["scored_sequence_simulations"][0]["ev_correlation_score"] is None  # constant simulation
    assert second["scored_sequence_simulations"][2]["simulation"]["expected_activations"][3] == 0.0  # failed token

    # explanations are published as continuations, and read back cleaned
    assert raw["scored_explanations"][0]["explanation"] == " years in dates"
    back = interchange.read_explanations(text, "explanations/4/9.jsonl")
    assert back == [
        {"explanation": "years in dates", "score": pytest.approx(scored[0]["scores"]["score_all"]), "neuron_id": (4, 9)},
        {"explanation": "nothing", "score": pytest.approx(scored[1]["scores"]["score_all"]), "neuron_id": (4, 9)},
    ]


def test_nan_score_reads_as_none_and_several_lines_keep_order():
    scored = scored_example(np.random.default_rng(3))
    scored[0]["scores"]["score_all"] = float("nan")
    a = interchange.dumps(interchange.simulation_results(1, 2, scored[:1]))
    b = interchange.dumps(interchange.simulation_results(1, 3, scored[1:]))
    back = interchange.read_explanations(a + "\n\n" + b, "two.jsonl")
    assert [(x["explanation"], x["neuron_id"]) for x in back] == [("years in dates", (1, 2)), ("nothing", (1, 3))]
    assert back[0]["score"] is None and back[1]["score"] == pytest.approx(scored[1]["scores"]["score_all"])


PUBLISHED_STYLE = (
    '{"dataclass_name": "NeuronSimulationResults", "neuron_id": {"dataclass_name": "NeuronId", '
    '"layer_index": 0, "neuron_index": 5}, "scored_explanations": [{"dataclass_name": '
    '"ScoredExplanation", "explanation": " the word \'the\' in lists", "scored_simulation": '
    '{"dataclass_name": "ScoredSimulation", "scored_sequence_simulations": [{"dataclass_name": '
    '"ScoredSequenceSimulation", "simulation": {"dataclass_name": "SequenceSimulation", "tokens": '
    '[" the", " cat"], "expected_activations": [0.5, 0.1], "activation_scale": '
    '"simulated_normalized_activations", "distribution_values": [[0, 1], [0]], "distribution_probabilities": '
    '[[0.5, 0.5], [1.0]]}, "true_activations": [1.2, 0.0], "ev_correlation_score": 1.0, '
    '"rsquared_score": 0.2, "absolute_dev_explained_score": 0.3}], "ev_correlation_score": 0.42, '
    '"rsquared_score": 0.2, "absolute_dev_explained_score": 0.3}}]}'
)


def test_published_style_file_parses():
    assert not PUBLISHED_STYLE.endswith("\n")
    back = interchange.read_explanations(PUBLISHED_STYLE, "explanations/0/5.jsonl")
    assert back == [{"explanation": "the word 'the' in lists", "score": 0.42, "neuron_id": (0, 5)}]
    # the same object pretty-printed (.json), and without any dataclass_name field
    obj = json.loads(PUBLISHED_STYLE)
    assert interchange.read_explanations(json.dumps(obj, indent=2), "e.json") == back

    def strip_names(x):
        if isinstance(x, dict):
            return {k: strip_names(v) for k, v in x.items() if k != "dataclass_name"}
        return [strip_names(v) for v in x] if isinstance(x, list) else x

    assert interchange.read_explanations(json.dumps(strip_names(obj)), "e.jsonl") == back
    # Python's json writes NaN for a NaN score: read, as no score
    obj["scored_explanations"][0]["scored_simulation"]["ev_correlation_score"] = float("nan")
    assert interchange.read_explanations(json.dumps(obj), "e.jsonl")[0]["score"] is None


def broken(change):
    obj = json.loads(PUBLISHED_STYLE)
    change(obj)
    return json.dumps(obj)


def set_at(path, value):
    def change(obj):
        for key in path[:-1]:
            obj = obj[key]
        if value is DELETE:
            del obj[path[-1]]
        else:
            obj[path[-1]] = value

    return change


DELETE = object()
FIRST = ("scored_explanations", 0)


@pytest.mark.parametrize(
    "text, match",
    [
        ("", r"explanations/0/5\.jsonl: empty"),
        ("{not json", r"explanations/0/5\.jsonl: line 1 is not JSON"),
        (PUBLISHED_STYLE + "\n\n" + PUBLISHED_STYLE[:-3] + "\n", r"explanations/0/5\.jsonl: line 3 is not JSON"),
        ("[1, 2]", r"explanations/0/5\.jsonl: expected a NeuronSimulationResults object, got list"),
        ('{"dataclass_name": "NeuronRecord"}', r"explanations/0/5\.jsonl: is a NeuronRecord, expected NeuronSimulationResults"),
        (broken(set_at(("scored_explanations",), DELETE)), r"explanations/0/5\.jsonl: no 'scored_explanations' list \(missing\)"),
        (broken(set_at(("scored_explanations",), {})), r"explanations/0/5\.jsonl: no 'scored_explanations' list \(got \{\}\)"),
        (broken(set_at(("neuron_id", "layer_index"), "0")), r"explanations/0/5\.jsonl: neuron_id: no 'layer_index' integer"),
        (broken(set_at(("neuron_id",), DELETE)), r"explanations/0/5\.jsonl: no 'neuron_id' object"),
        (broken(set_at((*FIRST, "explanation"), 5)), r"explanations/0/5\.jsonl: scored_explanations\[0\]: no 'explanation' string \(got 5\)"),
        (broken(set_at((*FIRST, "scored_simulation"), DELETE)), r"scored_explanations\[0\]: no 'scored_simulation' object"),
        (
            broken(set_at((*FIRST, "scored_simulation", "ev_correlation_score"), "0.4")),
            r"explanations/0/5\.jsonl: scored_explanations\[0\]\.scored_simulation: no 'ev_correlation_score' number",
        ),
        (broken(set_at((*FIRST, "scored_simulation", "ev_correlation_score"), True)), r"no 'ev_correlation_score' number \(got true\)"),
    ],
)
def test_malformed_explanations_name_file_and_problem(text, match):
    with pytest.raises(ValueError, match=match):
        interchange.read_explanations(text, "explanations/0/5.jsonl")


def test_export_refuses_mismatched_lengths():
    with pytest.raises(ValueError, match="3 tokens but 2 activations"):
        interchange.activation_record(["a", "b", "c"], np.zeros(2))
    sequences = [{"tokens": ["a", "b"], "expected": np.zeros(2), "true": np.zeros(3)}]
    scores = {"score_all": 0.0, "rsquared": 0.0, "abs_dev_explained": 0.0}
    with pytest.raises(ValueError, match="2 tokens, 2 expected and 3 true activations"):
        interchange.simulation_results(0, 0, [{"explanation": "x", "sequences": sequences, "scores": scores}])


def test_dumps_writes_null_for_non_finite_values():
    text = interchange.dumps({"a": [np.float32(np.nan), np.inf, -np.inf, 1.5], "b": np.array([np.nan, 2.0]), "c": np.int64(3)})
    assert text == '{"a": [null, null, null, 1.5], "b": [null, 2.0], "c": 3}'
    strict_loads(text)
