import polars as pl

from neuron_assets.checks import no_silent_zero_simulations, scores_in_range

NAN = float("nan")


def scores(all_, top, random):
    return pl.DataFrame({"score_all": all_, "score_top": top, "score_random": random})


def test_nan_scores_are_counted_not_failed():
    result = scores_in_range(scores([0.5, NAN, -1.0], [NAN, 0.1, 1.0], [0.0, 0.2, None]))
    assert result["passed"]
    assert result["metadata"]["NaN score_all"] == 1 and result["metadata"]["NaN score_random"] == 1


def test_a_score_outside_minus_one_to_one_fails():
    result = scores_in_range(scores([1.5, 0.0], [0.0, -1.2], [0.0, 0.0]))
    assert not result["passed"] and result["metadata"]["scores out of [-1, 1]"] == 2


def sims(expected, error):
    return pl.DataFrame({"unit": [0] * len(expected), "variant": ["llm"] * len(expected),
                         "seq_id": list(range(len(expected))), "expected": expected, "error": error},
                        schema_overrides={"expected": pl.List(pl.Float32)})


def test_all_zero_or_nan_simulation_without_an_error_is_caught():
    assert no_silent_zero_simulations(sims([[0.1, 2.0], [0.0, 0.3]], [None, None]))["passed"]
    assert not no_silent_zero_simulations(sims([[0.0, 0.0], [0.0, 0.3]], [None, None]))["passed"]
    assert not no_silent_zero_simulations(sims([[NAN, 1.0]], [None]))["passed"]
    assert no_silent_zero_simulations(sims([None], ["simulator failed: boom"]))["passed"]
