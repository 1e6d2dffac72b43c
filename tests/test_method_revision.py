import json
import math

import numpy as np
import pytest

from neuron_assets.method.prompts import EXPLANATION_PREFIX, clean_explanation
from neuron_assets.method.revision import (
    FALSE_ALARMS_HEADER,
    MISSES_HEADER,
    PREDICTED_LABEL,
    REVISION_INSTRUCTION,
    SHOWN_HEADER,
    counterexamples,
    predicted_tokens,
    revision_gain,
    revision_messages,
)


def a(*values):
    return np.array(values, np.float64)


# ---- counterexamples --------------------------------------------------------------------------


def test_strong_real_peak_with_zero_simulation_is_a_miss_and_the_reverse_a_false_alarm():
    real = [a(0, 4, 0), a(0, 0, 0), a(1, 0, 0)]
    sim = [a(0, 0, 0), a(0, 9, 0), a(2.5, 0, 0)]
    # gaps (peak 4): seq 0 miss 1.0; seq 1 false alarm 0.9; seq 2 miss 0.25, fa 0.25 -> neither
    assert counterexamples(real, sim, peak=4.0) == ([0], [1])


def test_gaps_below_min_gap_are_not_picked():
    real = [a(0, 2.9), a(0, 3.0)]
    sim = [a(0, 0), a(0, 0)]
    # miss gaps 0.29 and 0.30 with peak 10
    assert counterexamples(real, sim, peak=10.0) == ([1], [])
    assert counterexamples(real, sim, peak=10.0, min_gap=0.31) == ([], [])
    assert counterexamples(real, sim, peak=10.0, min_gap=0.0) == ([1, 0], [])


def test_largest_first_and_n_limits():
    real = [a(5, 0), a(10, 0), a(7, 0), a(0, 0), a(0, 0), a(0, 0), a(0, 0)]
    sim = [a(0, 0), a(0, 0), a(0, 0), a(0, 4), a(0, 8), a(0, 6), a(0, 10)]
    assert counterexamples(real, sim, peak=10.0) == ([1, 2], [6, 4])
    assert counterexamples(real, sim, peak=10.0, n_misses=3, n_false_alarms=4) == ([1, 2, 0], [6, 4, 5, 3])
    assert counterexamples(real, sim, peak=10.0, n_misses=0, n_false_alarms=1) == ([], [6])
    # negative activations count as 0: nothing fires, nothing is missed
    assert counterexamples([a(-5.0, -9.0)], [a(0, 0)], peak=1.0) == ([], [])


def test_nan_simulation_tokens_are_ignored():
    # the only large gaps sit on NaN tokens
    real = [a(10, 0), a(0, 0), a(5, 0)]
    sim = [a(np.nan, 0), a(0, np.nan), a(np.nan, np.nan)]
    assert counterexamples(real, sim, peak=10.0, min_gap=0.0) == ([0, 1], [])
    real = [a(10, 0)]
    assert counterexamples(real, [a(np.nan, 9)], peak=10.0) == ([], [0])


def test_a_sequence_is_never_both_and_goes_to_its_larger_gap():
    # seq 0: miss 1.0 (token 0), false alarm 0.8 (token 1) -> miss
    # seq 1: miss 0.5, false alarm 0.9 -> false alarm
    real = [a(10, 0), a(5, 0)]
    sim = [a(0, 8), a(0, 9)]
    misses, alarms = counterexamples(real, sim, peak=10.0, n_misses=5, n_false_alarms=5)
    assert (misses, alarms) == ([0], [1])
    assert not set(misses) & set(alarms)


def test_counterexamples_rejects_bad_input():
    with pytest.raises(ValueError):
        counterexamples([a(1)], [a(1)], peak=0.0)
    with pytest.raises(ValueError):
        counterexamples([a(1)], [], peak=1.0)
    with pytest.raises(ValueError):
        counterexamples([a(1, 2)], [a(1)], peak=1.0)


# ---- revision_messages ------------------------------------------------------------------------


SHOWN = [(["the", " cat"], a(0, 2.0)), ([" dog"], a(1.0))]
MISSES = [([" kitten", " sat"], a(4.0, 0))]
ALARMS = [([" car", " wheel"], a(0, 0.4), a(7.6, 0.2))]


def user_lines(messages):
    return messages[1]["content"].split("\n")


def test_message_structure():
    messages = revision_messages("cats and other pets.", SHOWN, MISSES, ALARMS)
    assert [m["role"] for m in messages] == ["system", "user"]
    assert messages[0]["content"] == REVISION_INSTRUCTION
    assert "token<TAB>activation" in REVISION_INSTRUCTION and "0" in REVISION_INSTRUCTION
    lines = user_lines(messages)
    assert lines[0] == SHOWN_HEADER
    assert "Earlier explanation: the main thing this neuron does is find cats and other pets." in lines
    assert lines[-1].endswith(EXPLANATION_PREFIX)
    assert lines.index(SHOWN_HEADER) < lines.index(MISSES_HEADER) < lines.index(FALSE_ALARMS_HEADER)
    earlier = next(i for i, line in enumerate(lines) if line.startswith("Earlier explanation:"))
    assert lines.index(SHOWN_HEADER) < earlier < lines.index(MISSES_HEADER)


def test_one_value_scale_across_sections():
    content = revision_messages("cats", SHOWN, MISSES, ALARMS)[1]["content"]
    # the miss peak 4.0 is the max: it shows 10; shown 2.0 -> 5, 1.0 -> 2; alarm 0.4 -> 1
    expected = (
        f"{SHOWN_HEADER}\n<start>\nthe\t0\n cat\t5\n<end>\n<start>\n dog\t2\n<end>\n"
        "\nEarlier explanation: the main thing this neuron does is find cats.\n"
        f"\n{MISSES_HEADER}\n<start>\n kitten\t10\n sat\t0\n<end>\n"
        f"\n{FALSE_ALARMS_HEADER}\n<start>\n car\t0\n wheel\t1\n<end>\n"
        f'{PREDICTED_LABEL} " car" (8)\n'
        f"\nRevised explanation of the neuron's behavior: {EXPLANATION_PREFIX}"
    )
    assert content == expected


def test_empty_sections_are_left_out():
    only_alarms = revision_messages("cats", SHOWN, [], ALARMS)[1]["content"]
    assert MISSES_HEADER not in only_alarms and FALSE_ALARMS_HEADER in only_alarms
    only_misses = revision_messages("cats", SHOWN, MISSES, [])[1]["content"]
    assert FALSE_ALARMS_HEADER not in only_misses and PREDICTED_LABEL not in only_misses
    assert MISSES_HEADER in only_misses
    # without the miss, the shown records set the scale: 2.0 -> 10
    assert " cat\t10" in revision_messages("cats", SHOWN, [], [])[1]["content"]


def test_false_alarm_predicted_tokens_are_listed():
    tokens = [" a", " b", " c", " d"]
    assert predicted_tokens(tokens, a(0.99, 1.0, np.nan, 9.6)) == '" b" (1), " d" (10)'
    assert predicted_tokens(tokens, a(0, 0, 0, 0)) == "(none)"
    alarms = [([" x", " y"], a(0, 0), a(5.0, 0.0)), ([" z"], a(0), a(3.2))]
    lines = user_lines(revision_messages("cats", SHOWN, [], alarms))
    assert [line for line in lines if line.startswith(PREDICTED_LABEL)] == [
        f'{PREDICTED_LABEL} " x" (5)',
        f'{PREDICTED_LABEL} " z" (3)',
    ]


def test_prefill_adds_the_assistant_turn():
    messages = revision_messages("cats", SHOWN, MISSES, ALARMS, prefill=True)
    assert [m["role"] for m in messages] == ["system", "user", "assistant"]
    assert messages[2]["content"] == EXPLANATION_PREFIX
    assert messages[:2] == revision_messages("cats", SHOWN, MISSES, ALARMS)
    assert clean_explanation(f"{EXPLANATION_PREFIX} dogs.") == "dogs"


def test_odd_tokens_stay_on_one_line():
    odd = ["<script>", "a\tb", "line\nbreak", "😀", "\r"]
    shown = [(odd, a(1, 2, 3, 4, 5))]
    alarms = [(odd, a(0, 0, 0, 0, 0), a(9, 9, 9, 9, 9))]
    lines = user_lines(revision_messages("cats", shown, [(odd, a(5, 0, 0, 0, 0))], alarms))
    rows = [line for line in lines if "\t" in line]
    assert len(rows) == 3 * len(odd)
    assert all(line.count("\t") == 1 for line in rows)
    assert "<script>\t2" in rows and "a\\tb\t4" in rows and "line\\nbreak\t6" in rows
    assert "😀\t8" in rows and "\\r\t10" in rows
    predicted = next(line for line in lines if line.startswith(PREDICTED_LABEL))
    listed = predicted[len(PREDICTED_LABEL) + 1 :]
    assert listed == ", ".join(f"{json.dumps(t, ensure_ascii=False)} (9)" for t in odd)
    assert '"a\\tb"' in listed and '"line\\nbreak"' in listed and "😀" in listed


# ---- revision_gain ----------------------------------------------------------------------------


def test_revision_gain():
    first = [0.2, 0.5, math.nan, 0.1, 0.4]
    revised = [0.4, 0.4, 0.9, math.nan, 0.7]
    # pairs 0, 1, 4: (0.2 - 0.1 + 0.3) / 3
    assert revision_gain(first, revised) == pytest.approx(0.4 / 3)
    assert math.isnan(revision_gain([math.nan], [0.5]))
    assert math.isnan(revision_gain([], []))
    with pytest.raises(ValueError):
        revision_gain([0.1], [])
