"""Golden tests for the remote simulation prompts and parsers (method/remote.py).

Echoes and chat answers are built by hand, token by token, with hand-picked probabilities, so
every expected number below can be checked on paper.
"""

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest

from neuron_assets.method.prompts import format_record, load_fewshot, simulator_prefix
from neuron_assets.method.remote import (
    METHODS,
    all_at_once_prompt,
    chat_simulation_messages,
    json_simulation_messages,
    read_all_at_once,
    read_chat_logprobs,
    read_json_simulation,
    value_probs,
)
from neuron_assets.method.simulation import expected_values

PROMPTS = Path(__file__).resolve().parents[1] / "resources" / "prompts"
L = math.log

HEADER = (
    "Neuron 4\nExplanation of neuron 4 behavior: the main thing this neuron does is find "
    "greetings.\nActivations:\n<start>\n"
)
TOKENS = [" hello", " world", "!"]
PROMPT = "PREFIX\n\n" + HEADER + " hello\tunknown\n world\tunknown\n!\tunknown\n<end>\n"

# hand-picked distributions at the three value positions
TOP_0 = {"0": L(0.5), "2": L(0.25), " 2": L(0.125), "unknown": L(0.125)}  # p0 .5, p2 .375
TOP_1 = {"10": L(0.6), "1": L(0.2), "x": L(0.2)}  # p10 .6, p1 .2
TOP_2 = {"unknown": L(0.9), "the": L(0.1)}  # no value token at all
EV_0 = 2 * 0.375 / 0.875  # 6/7
EV_1 = (10 * 0.6 + 1 * 0.2) / 0.8  # 7.75


def echo(tail: list[str], tops: dict[int, dict], prompt: str = PROMPT):
    """An echo whose first token is everything before `tail`; tops maps tail index -> top dict."""
    head = prompt[: len(prompt) - len("".join(tail))]
    assert head + "".join(tail) == prompt
    tokens = [head] + tail
    top = [None] + [tops.get(i, {"other": L(1.0)}) for i in range(len(tail))]
    return tokens, top


SEPARATE = [" hello", "\t", "unknown", "\n", " world", "\t", "unknown", "\n", "!", "\t", "unknown", "\n", "<end>", "\n"]
SEPARATE_TOPS = {2: TOP_0, 6: TOP_1, 10: TOP_2}


def test_methods_in_order_of_preference():
    assert METHODS == ("all_at_once", "chat_logprobs", "json")


def test_all_at_once_prompt_and_offsets():
    prompt, offsets = all_at_once_prompt("PREFIX\n\n", "greetings", TOKENS)
    assert prompt == PROMPT
    assert offsets == [PROMPT.index(" hello\t") + 7, PROMPT.index(" world\t") + 7, PROMPT.index("!\t") + 2]
    for offset in offsets:
        assert prompt[offset - 1] == "\t" and prompt[offset : offset + 7] == "unknown"
    with pytest.raises(ValueError):
        all_at_once_prompt("PREFIX\n\n", "greetings", [])


def test_value_probs_by_hand():
    p = value_probs({"3": L(0.5), " 3": L(0.1), "x": L(0.4)})
    assert p[3] == pytest.approx(0.6) and p.sum() == pytest.approx(0.6)
    p = value_probs({"10": L(0.3), "\n7": L(0.2), "05": L(0.1), "1.0": L(0.1), "-1": L(0.1), " 0 ": L(0.2)})
    assert p[10] == pytest.approx(0.3) and p[7] == pytest.approx(0.2) and p[0] == pytest.approx(0.2)
    assert p.sum() == pytest.approx(0.7)  # "05", "1.0" and "-1" are not values
    assert value_probs({}).tolist() == [0.0] * 11


def test_read_all_at_once_separate_tokens_and_expected_values():
    tokens, tops = echo(SEPARATE, SEPARATE_TOPS)
    _, offsets = all_at_once_prompt("PREFIX\n\n", "greetings", TOKENS)
    probs, failed = read_all_at_once(tokens, None, tops, PROMPT, offsets)
    assert failed.tolist() == [False, False, False]
    np.testing.assert_allclose(probs[0], [0.5, 0, 0.375] + [0] * 8)
    np.testing.assert_allclose(probs[1], [0, 0.2] + [0] * 8 + [0.6])
    assert probs[2].tolist() == [0.0] * 11
    ev, ev_failed = expected_values(probs)
    assert ev[0] == pytest.approx(EV_0) and ev[1] == pytest.approx(EV_1)
    # a position with no value token in the top-K is NaN, never 0
    assert np.isnan(ev[2]) and ev_failed.tolist() == [False, False, True]


def test_read_all_at_once_merged_tab_fails_that_position_only():
    tail = [" hello", "\tunknown", "\n", " world", "\t", "unknown", "\n", "!", "\t", "unknown", "\n", "<end>", "\n"]
    tokens, tops = echo(tail, {1: TOP_0, 5: TOP_1, 9: TOP_0})
    _, offsets = all_at_once_prompt("PREFIX\n\n", "greetings", TOKENS)
    probs, failed = read_all_at_once(tokens, None, tops, PROMPT, offsets)
    assert failed.tolist() == [True, False, False]
    assert probs[0].tolist() == [0.0] * 11
    ev, _ = expected_values(probs)
    assert np.isnan(ev[0]) and ev[1] == pytest.approx(EV_1) and ev[2] == pytest.approx(EV_0)
    # a token spanning the offset ("\tunk", "nown") fails too
    tail = [" hello", "\tunk", "nown"] + SEPARATE[3:]
    tokens, tops = echo(tail, {2: TOP_0, 6: TOP_1, 10: TOP_0})
    assert read_all_at_once(tokens, None, tops, PROMPT, offsets)[1].tolist() == [True, False, False]


def test_read_all_at_once_split_subject_token_still_aligns():
    tail = [" hel", "lo"] + SEPARATE[1:]
    tokens, tops = echo(tail, {i + 1: t for i, t in SEPARATE_TOPS.items()})
    _, offsets = all_at_once_prompt("PREFIX\n\n", "greetings", TOKENS)
    probs, failed = read_all_at_once(tokens, None, tops, PROMPT, offsets)
    assert failed.tolist() == [False, False, False]
    assert expected_values(probs)[0][1] == pytest.approx(EV_1)
    # the same echo with the server's own offsets
    starts = np.cumsum([0] + [len(t) for t in tokens[:-1]]).tolist()
    probs2, failed2 = read_all_at_once(tokens, starts, tops, PROMPT, offsets)
    assert np.array_equal(probs, probs2) and np.array_equal(failed, failed2)


def test_read_all_at_once_tabs_and_newlines_inside_tokens():
    subject = ["a\tb", "\n"]  # shown as a\tb and \n (escaped): one real TAB per line
    prompt, offsets = all_at_once_prompt("P\n", "x", subject)
    assert prompt.endswith("<start>\na\\tb\tunknown\n\\n\tunknown\n<end>\n")
    tail = ["a", "\\", "tb", "\t", "unknown", "\n", "\\n", "\t", "unknown", "\n", "<end>", "\n"]
    tokens, tops = echo(tail, {4: TOP_1, 8: TOP_0}, prompt)
    probs, failed = read_all_at_once(tokens, None, tops, prompt, offsets)
    ev, ev_failed = expected_values(probs)
    assert not failed.any() and ev[0] == pytest.approx(EV_1) and ev[1] == pytest.approx(EV_0)


def test_read_all_at_once_bos_in_front_is_skipped():
    tokens, tops = echo(SEPARATE, SEPARATE_TOPS)
    tokens, tops = ["<s>"] + tokens, [None, {"x": 0.0}] + tops[1:]
    _, offsets = all_at_once_prompt("PREFIX\n\n", "greetings", TOKENS)
    ev, _ = expected_values(read_all_at_once(tokens, None, tops, PROMPT, offsets)[0])
    assert ev[0] == pytest.approx(EV_0) and ev[1] == pytest.approx(EV_1)


def test_read_all_at_once_byte_tokens_fail_clearly():
    _, offsets = all_at_once_prompt("PREFIX\n\n", "greetings", TOKENS)
    tokens, tops = echo(SEPARATE, SEPARATE_TOPS)
    # a byte-level server everywhere: tabs echo as "ĉ" and alignment is never regained
    byte_level = [t.replace("\t", "ĉ").replace(" ", "Ġ") for t in tokens]
    with pytest.raises(ValueError, match="do not spell the prompt"):
        read_all_at_once(byte_level, None, tops, PROMPT, offsets)
    tokens[-1] = "bytes:\\xe2\\x80"  # after the last TAB: nothing to regain alignment on
    with pytest.raises(ValueError, match="not plain text"):
        read_all_at_once(tokens, None, tops, PROMPT, offsets)


def test_fragments_of_a_split_character_are_skipped_up_to_the_tab():
    """A character split over tokens echoes as fragments that do not spell it: alignment is
    regained at the TAB ending that subject token, so every value is still read."""
    _, offsets = all_at_once_prompt("PREFIX\n\n", "greetings", TOKENS)
    tokens, tops = echo(SEPARATE, SEPARATE_TOPS)
    i = tokens.index(" world")
    tokens[i : i + 1] = [" wor", "\ufffd", "\ufffd"]  # " world" echoed as a piece and two fragments
    tops = tops[:i] + [None, None, None] + tops[i + 1 :]
    probs, failed = read_all_at_once(tokens, None, tops, PROMPT, offsets)
    assert not failed.any()
    plain_tokens, plain_tops = echo(SEPARATE, SEPARATE_TOPS)
    reference, _ = read_all_at_once(plain_tokens, None, plain_tops, PROMPT, offsets)
    np.testing.assert_allclose(probs, reference)
    # server offsets that point at other text are refused, not read
    tokens, tops = echo(SEPARATE, SEPARATE_TOPS)
    shifted = (np.cumsum([0] + [len(t) for t in tokens[:-1]]) + 1).tolist()
    shifted[0] = 0
    with pytest.raises(ValueError, match="do not refer to this prompt"):
        read_all_at_once(tokens, shifted, tops, PROMPT, [o + 1 for o in offsets])
    with pytest.raises(ValueError):
        read_all_at_once(tokens, None, tops[:-1], PROMPT, offsets)


def split_lines(text: str) -> list[str]:
    """A plausible tokenization: tabs and newlines are tokens of their own."""
    return [t for t in re.split(r"(\t|\n)", text) if t]


def test_all_at_once_reads_back_the_fewshot_prompt():
    fewshot = load_fewshot(PROMPTS / "simulator_fewshot.json")
    neuron = fewshot[2]
    prompt, offsets = all_at_once_prompt(simulator_prefix(fewshot), neuron["explanation"], neuron["tokens"])
    tokens = split_lines(prompt)
    starts = np.cumsum([0] + [len(t) for t in tokens[:-1]]).tolist()
    # the "server" puts all mass on the true value at each read offset
    value_at = dict(zip(offsets, neuron["activations"]))
    tops = [None] + [{str(value_at.get(s, "x")): 0.0} for s in starts[1:]]
    ev, failed = expected_values(read_all_at_once(tokens, None, tops, prompt, offsets)[0])
    assert not failed.any() and ev.tolist() == neuron["activations"]


# chat with logprobs ---------------------------------------------------------------------------

CHAT_TOKENS = [" The", " cat", "\t"]
CHAT_TOPS = [{"0": L(0.8), "1": L(0.2)}, {"7": L(0.5), " 8": L(0.5)}, {"0": 0.0}]
CHAT_EV = [0.2, 7.5, 0.0]


def chat_content(lines: list[str], tops: list[dict]) -> list[tuple[str, dict]]:
    """Generated tokens: line text, TAB, value, newline; the value tokens carry `tops` in order."""
    content, values = [], iter(tops)
    for line in lines:
        for token in split_lines(line + "\n"):
            content.append((token, next(values) if content and content[-1][0] == "\t" else {token: 0.0}))
    return content


def test_read_chat_logprobs_all_good():
    content = chat_content(["<start>", " The\t0", " cat\t7", "\\t\t0", "<end>"], CHAT_TOPS)
    probs, failed = read_chat_logprobs(content, CHAT_TOKENS)
    ev, ev_failed = expected_values(probs)
    assert not failed.any() and not ev_failed.any()
    np.testing.assert_allclose(ev, CHAT_EV, rtol=1e-6)


def test_read_chat_logprobs_wrong_missing_extra_lines_fail_only_those():
    content = chat_content(["<start>", " The\t0", " dog\t7", "\\t\t0", "<end>"], CHAT_TOPS)
    assert read_chat_logprobs(content, CHAT_TOKENS)[1].tolist() == [False, True, False]
    content = chat_content([" The\t0", "\\t\t0"], [CHAT_TOPS[0], CHAT_TOPS[2]])
    probs, failed = read_chat_logprobs(content, CHAT_TOKENS)
    assert failed.tolist() == [False, True, False]
    assert expected_values(probs)[0][2] == 0.0  # the line after the gap keeps its own value
    content = chat_content([" The\t0", " note\t9", " cat\t7", "\\t\t0"], [CHAT_TOPS[0], {"9": 0.0}] + CHAT_TOPS[1:])
    ev, _ = expected_values(read_chat_logprobs(content, CHAT_TOKENS)[0])
    np.testing.assert_allclose(ev, CHAT_EV, rtol=1e-6)
    # " cat" written as "cat": not the token asked for
    content = chat_content([" The\t0", "cat\t7", "\\t\t0"], CHAT_TOPS)
    assert read_chat_logprobs(content, CHAT_TOKENS)[1].tolist() == [False, True, False]


def test_read_chat_logprobs_early_stop_and_merged_value():
    content = chat_content(["<start>", " The\t0", " cat\t7"], CHAT_TOPS[:2])[:-3]  # stops after " cat"
    assert [t for t, _ in content][-2:] == ["\n", " cat"]
    probs, failed = read_chat_logprobs(content, CHAT_TOKENS)
    assert failed.tolist() == [False, True, True]
    assert np.isnan(expected_values(probs)[0][1:]).all()
    content = chat_content([" The\t0"], CHAT_TOPS[:1]) + [(" cat", {}), ("\t", {})]  # stops after the TAB
    assert read_chat_logprobs(content, CHAT_TOKENS)[1].tolist() == [False, True, True]
    # TAB and value generated as one token: no token starts after the TAB
    content = [(" The", {}), ("\t0", {"\t0": 0.0}), ("\n", {}), (" cat", {}), ("\t", {}), ("7", {"7": 0.0})]
    assert read_chat_logprobs(content, CHAT_TOKENS)[1].tolist() == [True, False, True]
    assert read_chat_logprobs([], CHAT_TOKENS)[1].all()


def test_chat_messages_and_fewshot_round_trip():
    fewshot = load_fewshot(PROMPTS / "simulator_fewshot.json")
    messages = chat_simulation_messages("greetings", CHAT_TOKENS, fewshot)
    assert [m["role"] for m in messages] == ["system"] + ["user", "assistant"] * len(fewshot) + ["user"]
    assert messages[-1]["content"].endswith("find greetings.\nText:\n<start>\n The\n cat\n\\t\n<end>")
    neuron = fewshot[0]
    answer = messages[2]["content"]
    assert answer == format_record(neuron["tokens"], neuron["activations"])  # fully revealed
    assert "unknown" not in answer
    # the few-shot answer, fed back as a generation, reads back exactly its activations
    content = [(t, {t: 0.0}) for t in split_lines(answer)]
    ev, failed = expected_values(read_chat_logprobs(content, neuron["tokens"])[0])
    assert not failed.any() and ev.tolist() == neuron["activations"]


# JSON -----------------------------------------------------------------------------------------


def test_read_json_good_with_fence_and_prose():
    text = 'Sure [see below]:\n```json\n[{"token": " The", "activation": 0}, {"token": " cat", "activation": 7}]\n```\nDone.'
    values, failed, error = read_json_simulation(text, [" The", " cat"])
    assert values.dtype == np.float32 and values.tolist() == [0.0, 7.0]
    assert not failed.any() and error is None
    bare = 'Here: [{"token": "a", "activation": 2.5}] ok'
    assert read_json_simulation(bare, ["a"])[0].tolist() == [2.5]


def test_read_json_failures_are_recorded_with_messages():
    tokens = [" The", " cat"]
    values, failed, error = read_json_simulation('[{"token": " The", "activation": 0}]', tokens)
    assert np.isnan(values).all() and failed.all() and error == "expected 2 items, got 1"
    values, failed, error = read_json_simulation(
        '[{"token": " The", "activation": 3}, {"token": " dog", "activation": 7}]', tokens
    )
    assert values[0] == 3 and np.isnan(values[1]) and failed.tolist() == [False, True]
    assert error == "item 1: token ' dog' expected ' cat'"
    # the leading space is part of the token: "cat" is not " cat"
    _, failed, error = read_json_simulation('[{"token": " The", "activation": 0}, {"token": "cat", "activation": 7}]', tokens)
    assert failed.tolist() == [False, True] and error == "item 1: token 'cat' expected ' cat'"
    values, failed, error = read_json_simulation(
        '[{"token": " The", "activation": 11}, {"token": " cat", "activation": "x"}]', tokens
    )
    assert np.isnan(values).all() and failed.all()
    assert error == "item 0: activation 11 is not a number in 0..10; item 1: activation 'x' is not a number in 0..10"
    _, failed, error = read_json_simulation('[{"token": " The", "activation": true}, {"token": " cat"}]', tokens)
    assert failed.all() and "item 0: activation True" in error and "item 1: missing" in error
    values, failed, error = read_json_simulation("I cannot help with that.", tokens)
    assert np.isnan(values).all() and failed.all() and error == "no JSON list of objects in the answer"
    _, failed, error = read_json_simulation('```json\n[{"token": " The", "activation": 0},', tokens)
    assert failed.all() and error == "no JSON list of objects in the answer"


def test_json_messages_show_fewshot_as_json():
    fewshot = load_fewshot(PROMPTS / "simulator_fewshot.json")
    messages = json_simulation_messages("greetings", [" The", "\n"], fewshot)
    assert [m["role"] for m in messages] == ["system"] + ["user", "assistant"] * len(fewshot) + ["user"]
    assert messages[-1]["content"].endswith('find greetings.\nTokens: [" The", "\\n"]')
    neuron = fewshot[1]
    answer = messages[4]["content"]
    assert json.loads(answer) == [{"token": t, "activation": v} for t, v in zip(neuron["tokens"], neuron["activations"])]
    values, failed, error = read_json_simulation(answer, neuron["tokens"])
    assert error is None and values.tolist() == neuron["activations"]
