import json
from pathlib import Path

import numpy as np
import pytest

from neuron_assets.method.baseline import token_baseline
from neuron_assets.method.prompts import (
    ZEROS_FILTERED_NOTE,
    clean_explanation,
    display_token,
    explainer_messages,
    format_record,
    load_fewshot,
    normalized_values,
    prompt_version,
    simulator_prefix,
    simulator_segments,
)

PROMPTS = Path(__file__).resolve().parents[1] / "resources" / "prompts"
CLOSING = "Explanation of neuron 4 behavior: the main thing this neuron does is find"


def test_normalized_values_share_one_scale():
    assert normalized_values([np.array([-1, 0.5, 2.0]), np.array([1.0])]) == [[0, 2, 10], [5]]
    # under 10% of the max shows as 0; exactly 10% is 1
    assert normalized_values([np.array([0.099, 0.1, 1.0])]) == [[0, 1, 10]]
    assert normalized_values([np.array([-3.0, -1.0]), np.array([0.0])]) == [[0, 0], [0]]
    assert normalized_values([]) == []


def test_display_token_keeps_one_tab_per_row():
    assert display_token("a\tb\nc\rd\\e") == "a\\tb\\nc\\rd\\\\e"
    tokens = ["x\ty", "\n", "\\n", " plain"]
    text = format_record(tokens, [1, 0, "unknown", 10])
    lines = text.split("\n")
    assert lines[0] == "<start>" and lines[-2] == "<end>" and lines[-1] == ""
    assert len(lines) == len(tokens) + 3
    assert all(line.count("\t") == 1 for line in lines[1:-2])
    assert lines[3] == "\\\\n\tunknown"  # a literal backslash-n token stays distinct from a newline


def test_format_record_rejects_mismatched_lengths():
    with pytest.raises(ValueError):
        format_record(["a", "b"], [1])


def record(n_tokens, nonzero):
    acts = np.zeros(n_tokens)
    acts[:nonzero] = 5.0
    return [f" t{i}" for i in range(n_tokens)], acts


def test_explainer_messages_structure():
    fewshot = load_fewshot(PROMPTS / "explainer_fewshot.json")
    messages = explainer_messages([record(10, 5)], fewshot)
    assert [m["role"] for m in messages] == ["system"] + ["user", "assistant"] * len(fewshot) + ["user"]
    assert messages[-1]["content"].endswith(CLOSING)
    assert messages[-1]["content"].startswith("Neuron 4\nActivations:\n<start>\n t0\t10\n")
    for i, m in enumerate(messages[1:-1:2], 1):
        assert m["content"].endswith(f"Explanation of neuron {i} behavior: the main thing this neuron does is find")
    for m, neuron in zip(messages[2::2], fewshot):
        assert m["content"] == neuron["explanation"] + "."
    assert "<TAB>" in messages[0]["content"] or "token<tab>" in messages[0]["content"].lower()


def test_zero_filtered_repetition_below_20_percent():
    sparse = explainer_messages([record(10, 1)], [])[-1]["content"]  # 10% non-zero
    assert ZEROS_FILTERED_NOTE in sparse
    assert sparse.count("<start>") == 2
    assert sparse.split(ZEROS_FILTERED_NOTE)[1] == f"\n<start>\n t0\t10\n<end>\n\n{CLOSING}"
    at_threshold = explainer_messages([record(10, 2)], [])[-1]["content"]  # exactly 20%
    assert ZEROS_FILTERED_NOTE not in at_threshold and at_threshold.count("<start>") == 1
    # the share counts all records of the neuron together: 2 of 20 values
    two = explainer_messages([record(10, 2), record(10, 0)], [])[-1]["content"]
    assert ZEROS_FILTERED_NOTE in two
    assert ZEROS_FILTERED_NOTE not in explainer_messages([record(10, 0)], [])[-1]["content"]


def test_zero_filter_applies_to_fewshot_blocks():
    fewshot = [{"explanation": "x", "records": [{"tokens": ["a"] * 9 + ["b"], "activations": [0] * 9 + [3.0]}]}]
    messages = explainer_messages([record(10, 5)], fewshot)
    assert ZEROS_FILTERED_NOTE in messages[1]["content"]
    assert ZEROS_FILTERED_NOTE not in messages[-1]["content"]


def test_prefill_begins_the_answer_with_the_closing_phrase():
    fewshot = load_fewshot(PROMPTS / "explainer_fewshot.json")
    messages = explainer_messages([record(10, 5)], fewshot, prefill=True)
    assert messages[-1] == {"role": "assistant", "content": "the main thing this neuron does is find"}
    assert messages[-2]["role"] == "user" and messages[-2]["content"].endswith(CLOSING)
    assert messages[2]["content"] == f"the main thing this neuron does is find {fewshot[0]['explanation']}."


def test_clean_explanation():
    assert clean_explanation("  words about water.\nSecond line.") == "words about water"
    assert clean_explanation("The main thing this neuron does is find dates.") == "dates"
    assert clean_explanation("\n years such as 1999..") == "years such as 1999."
    assert clean_explanation("no period ") == "no period"


def test_simulator_prefix_and_segments():
    fewshot = load_fewshot(PROMPTS / "simulator_fewshot.json")
    prefix = simulator_prefix(fewshot)
    assert prefix == simulator_prefix(fewshot)
    first = fewshot[0]
    header = (
        f"Neuron 1\nExplanation of neuron 1 behavior: the main thing this neuron does is find "
        f"{first['explanation']}.\nActivations:\n<start>\n"
    )
    assert header in prefix
    body = prefix.split(header)[1].split("<end>\n")[0].splitlines()
    assert len(body) == len(first["tokens"])
    k = first["reveal_from"]
    assert all(line.endswith("\tunknown") for line in body[:k])
    assert [int(line.split("\t")[1]) for line in body[k:]] == first["activations"][k:]
    assert prefix.endswith("<end>\n\n")

    tokens = [" The", "\t", " cat"]
    segments = simulator_segments("cats", tokens)
    assert len(segments) == len(tokens)
    assert segments[0].startswith("Neuron 4\nExplanation of neuron 4 behavior: the main thing this neuron does is find cats.\n")
    assert segments[0].endswith("Activations:\n<start>\n The\t")
    assert segments[1:] == ["unknown\n\\t\t", "unknown\n cat\t"]
    full = "".join(segments) + "unknown\n<end>\n"
    assert full.splitlines()[-4:] == [" The\tunknown", "\\t\tunknown", " cat\tunknown", "<end>"]
    assert simulator_segments("cats", []) == []


def test_fewshot_files_are_valid():
    explainer = load_fewshot(PROMPTS / "explainer_fewshot.json")
    assert len(explainer) == 3
    for neuron in explainer:
        assert len(neuron["records"]) == 2
        assert all(20 <= len(r["tokens"]) <= 40 for r in neuron["records"])
    simulator = load_fewshot(PROMPTS / "simulator_fewshot.json")
    assert 2 <= len(simulator) <= 3


def test_load_fewshot_names_file_and_missing_field(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text(json.dumps([{"explanation": "x", "records": [{"tokens": ["a"]}]}]))
    with pytest.raises(ValueError, match=r"broken\.json.*'activations'"):
        load_fewshot(path)
    path.write_text(json.dumps([{"explanation": "x", "tokens": ["a"], "activations": [3]}]))
    with pytest.raises(ValueError, match=r"broken\.json.*'reveal_from'"):
        load_fewshot(path)
    path.write_text(json.dumps([{"tokens": ["a"], "activations": [3], "reveal_from": 0}]))
    with pytest.raises(ValueError, match=r"broken\.json.*'explanation'"):
        load_fewshot(path)
    path.write_text(json.dumps([{"explanation": "x", "tokens": ["a"], "activations": [11], "reveal_from": 0}]))
    with pytest.raises(ValueError, match="0-10"):
        load_fewshot(path)


def test_prompt_version():
    v = prompt_version("template", "fewshot")
    assert len(v) == 16 and int(v, 16) >= 0
    assert v == prompt_version("template", "fewshot")
    assert v != prompt_version("template", "fewshot!")
    assert prompt_version("ab", "c") != prompt_version("a", "bc")


def test_token_baseline_phrase():
    records = [
        ([" the", " river", " water", " the", "\n"], np.array([0.0, 4.0, 8.0, -1.0, 9.0])),
        ([" River", "river", " water", " dog"], np.array([1.0, 2.0, 6.0, 9.0])),
    ]
    # stripped: "river" x2 mean 3, "water" x2 mean 7, "the" x2 mean -0.5, "River" and "dog" once
    assert token_baseline(records) == 'the tokens "water" and "river"'
    assert token_baseline(records, n_tokens=1) == 'the token "water"'
    # nothing seen 3 times: fall back to every token; "\n" is whitespace only and ignored
    assert token_baseline(records, min_count=3) == 'the tokens "dog", "water", "river" and "River"'


def test_token_baseline_escapes_and_gives_up():
    records = [(['say "hi"', "a\\b"], np.array([2.0, 1.0]))]
    phrase = token_baseline(records)
    assert phrase == 'the tokens "say \\"hi\\"" and "a\\\\b"'
    assert json.loads(phrase[len("the tokens ") :].split(" and ")[0]) == 'say "hi"'
    assert token_baseline([([" a", " b"], np.array([0.0, -1.0]))]) is None
