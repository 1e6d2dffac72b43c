"""Simulation through a remote OpenAI-compatible API (docs/method.md, Simulation).

Three ways to get a prediction per token from a server, in order of preference (`METHODS`):

- all_at_once: the paper's method. One `/completions` request per sequence with `echo=True,
  logprobs=K, max_tokens=0` (vLLM serves it): the server scores the prompt we send and returns,
  for every prompt token, its top-K alternatives. The alternatives of the token written right
  after each `token<TAB>` are the simulator's distribution over the values 0-10.
- chat_logprobs: a chat model copies the text as `token<TAB>value` lines at temperature 0 with
  `logprobs=True, top_logprobs=K`; the alternatives of the first token after each TAB are read.
- json: no logprobs at all; the model writes a JSON list of integer activations. These are
  point estimates, not expected values: their scores are not comparable with the other two.

The first two readers return (probs [T, 11], failed [T]). Failed rows are all zero, so
`simulation.expected_values(probs)` turns them, and rows with no mass on any value, into NaN:
a position we could not read is never a silent prediction of 0.
"""

import difflib
import json
import math
import re

import numpy as np

from neuron_assets.method.prompts import EXPLANATION_PREFIX, display_token, format_record, simulator_segments
from neuron_assets.method.simulation import VALUES

METHODS = ("all_at_once", "chat_logprobs", "json")

# "0".."10" exactly; "05", "1.0", "-1" are not value tokens
VALUE_TOKENS = {str(v): v for v in VALUES}

# -----------------------------------------------------------------------------
# reading a distribution over the values 0..10


def value_probs(top: dict[str, float]) -> np.ndarray:
    """Probabilities [11] over the values 0..10 from a top-logprobs dict {token: logprob}.

    p_v = sum of exp(logprob) over the tokens that read as v once surrounding whitespace is
    stripped, so "5", " 5" and "5\\n" all add to p_5 (summed as probabilities, not logprobs).
    Unnormalised: mass outside the values (e.g. "unknown") is simply dropped.

    A tokenizer with a single "10" token gives p_10 directly. One that splits numbers into
    digits (Llama, Mistral, ...) writes 10 as "1" then "0", so its "1" is ambiguous: here it
    counts as 1, which moves the mass of 10 onto 1. The local simulator resolves this with a
    second read (`simulation.value_distribution`); a single echo request cannot.
    """
    probs = np.zeros(len(VALUES))
    for token, logprob in top.items():
        v = VALUE_TOKENS.get(token.strip())
        if v is not None:
            probs[v] += math.exp(logprob)
    return probs


def _first_token_at(starts: list[int]) -> dict[int, int]:
    """Offset -> index of the first token that starts there."""
    first = {}
    for i, start in enumerate(starts):
        if start is not None:
            first.setdefault(int(start), i)
    return first


def _read_at(offset: int, first_at: dict[int, int], tokens: list[str], tops: list) -> np.ndarray | None:
    """The value distribution from the token that starts exactly at `offset`, or None.

    No token starting there (the server merged the TAB with the value, or a token spans the
    offset) or an empty token (a byte fragment of a longer character) is a failure: reading a
    neighbouring token instead would be a guess about another position's distribution."""
    i = first_at.get(offset)
    if i is None or not tokens[i] or tops[i] is None:
        return None
    return value_probs(tops[i])


# -----------------------------------------------------------------------------
# all at once: one echo request per sequence


def all_at_once_prompt(prefix: str, explanation: str, tokens: list[str]) -> tuple[str, list[int]]:
    """The whole prompt, prefix + segments + "unknown\\n<end>\\n", and the offsets (in that string)
    where each token's value is written: right after the TAB that ends segment i, where the
    prompt says "unknown" and the simulator's alternatives are a distribution over 0-10."""
    if not tokens:
        raise ValueError("no tokens to simulate")
    segments = simulator_segments(explanation, tokens)
    offsets, end = [], len(prefix)
    for segment in segments:
        end += len(segment)
        offsets.append(end)
    return prefix + "".join(segments) + "unknown\n<end>\n", offsets


def _echo_starts(echo_tokens: list[str], text_offsets: list[int] | None, prompt: str) -> list[int | None]:
    """Start offset in `prompt` of every echoed token (None where it cannot be known).

    Without server offsets, the tokens are laid end to end along the prompt. Tokens a server
    puts in front (a BOS such as "<s>") get None. A character split over several tokens echoes
    as fragments ("\ufffd") that do not spell it; they occur only inside a subject token's text
    (everything else in the prompt is ASCII), so alignment is regained at the TAB that ends that
    token, and the fragments get None (they are never read). Byte-level token strings ("Ġhello")
    never regain alignment: then we stop rather than guess."""
    if text_offsets is not None:
        if len(text_offsets) != len(echo_tokens):
            raise ValueError(f"{len(echo_tokens)} echoed tokens but {len(text_offsets)} offsets")
        return [int(s) for s in text_offsets]
    starts: list[int | None] = []
    pos, lost = 0, False
    for token in echo_tokens:
        if not lost and token and prompt.startswith(token, pos):
            starts.append(pos)
            pos += len(token)
        elif pos == 0:  # not yet in the prompt: text the server added in front
            starts.append(None)
        elif (tab := token.find("\t")) >= 0 and (t := prompt.find("\t", pos)) >= 0 and prompt.startswith(token[tab:], t):
            starts.append(t if tab == 0 else None)
            pos, lost = t + len(token) - tab, False
        else:
            starts.append(None)
            lost = True
    if lost or pos != len(prompt):
        text = "".join(echo_tokens)
        where = next((i for i, (a, b) in enumerate(zip(text, prompt)) if a != b), min(len(text), len(prompt)))
        raise ValueError(
            f"echoed tokens do not spell the prompt (near character {where}: {text[where:where + 20]!r} vs "
            f"{prompt[where:where + 20]!r}); the server returned tokens that are not plain text "
            "(byte-level tokens?): pass its text_offset or use a server that returns decoded tokens"
        )
    return starts


def read_all_at_once(
    echo_tokens: list[str], text_offsets: list[int] | None, top_logprobs: list[dict[str, float] | None],
    prompt: str, read_offsets: list[int],
) -> tuple[np.ndarray, np.ndarray]:
    """Value distributions from an echoed prompt.

    echo_tokens: the prompt as the server tokenized it; text_offsets: their start offsets in the
    prompt, or None for cumulative lengths (vLLM's text_offset is just that, counted from any BOS
    it echoes: pass None there, only that path skips a BOS); top_logprobs: per token
    {token: logprob}, None for the first. The top_logprobs of the echoed token that STARTS at a
    read offset is the distribution over what follows that TAB. Returns (probs [T, 11] float64
    unnormalised, failed bool [T]); a failed row is all zero."""
    if len(top_logprobs) != len(echo_tokens):
        raise ValueError(f"{len(echo_tokens)} echoed tokens but {len(top_logprobs)} top_logprobs")
    starts = _echo_starts(echo_tokens, text_offsets, prompt)
    first_at = _first_token_at(starts)
    probs = np.zeros((len(read_offsets), len(VALUES)))
    failed = np.ones(len(read_offsets), dtype=bool)
    for t, offset in enumerate(read_offsets):
        i = first_at.get(offset)
        # offsets from the server are trusted only as far as the text they point at agrees
        if i is not None and not prompt.startswith(echo_tokens[i], offset):
            raise ValueError(
                f"echoed token {i} {echo_tokens[i]!r} does not match the prompt at offset {offset} "
                f"({prompt[offset:offset + 20]!r}): the offsets do not refer to this prompt"
            )
        p = _read_at(offset, first_at, echo_tokens, top_logprobs)
        if p is not None:
            probs[t], failed[t] = p, False
    return probs, failed


# -----------------------------------------------------------------------------
# chat with logprobs: the model copies the text as token<TAB>value lines

CHAT_SIMULATOR_INSTRUCTION = (
    "You are helping to interpret the neurons of a language model. You are given a description "
    "of the feature a neuron detects and a short text, listed one token per line. Predict how "
    "strongly the neuron fires on each token. Answer by copying the listing: <start>, then every "
    "token exactly as given, one per line and in the same order, each followed by a tab and an "
    "integer from 0 (silent) to 10 (strongest response), then <end>. Most activations are 0."
)


def _chat_question(explanation: str, tokens: list[str]) -> str:
    listing = "".join(f"{display_token(t)}\n" for t in tokens)
    return f"Neuron behavior: {EXPLANATION_PREFIX} {explanation}.\nText:\n<start>\n{listing}<end>"


def chat_simulation_messages(explanation: str, tokens: list[str], fewshot: list[dict]) -> list[dict]:
    """System instruction; per few-shot neuron (explanation, tokens, activations 0-10) a user turn
    listing its tokens and the fully revealed record as the answer; the target's user turn."""
    messages = [{"role": "system", "content": CHAT_SIMULATOR_INSTRUCTION}]
    for neuron in fewshot:
        answer = format_record(neuron["tokens"], [int(v) for v in neuron["activations"]])
        messages.append({"role": "user", "content": _chat_question(neuron["explanation"], neuron["tokens"])})
        messages.append({"role": "assistant", "content": answer})
    messages.append({"role": "user", "content": _chat_question(explanation, tokens)})
    return messages


def read_chat_logprobs(content: list[tuple[str, dict[str, float]]], tokens: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Value distributions from a chat answer of `token<TAB>value` lines.

    content: the generated tokens as (token, {alternative: logprob}). A line belongs to token i
    if the text before its first TAB is exactly display_token(tokens[i]); lines are matched to
    tokens in order (difflib on the two sequences), so a missing, wrong or extra line costs
    only the tokens involved, and lines without a TAB (<start>, <end>, blank) are ignored. The
    distribution is the alternatives of the generated token starting right after the TAB; none
    starting there (e.g. "\\t3" generated as one token, or the answer stopped) fails.
    Returns (probs [T, 11] float64 unnormalised, failed bool [T]); a failed row is all zero."""
    generated = [token for token, _ in content]
    tops = [top for _, top in content]
    starts = np.cumsum([0] + [len(t) for t in generated[:-1]]).tolist() if generated else []
    first_at = _first_token_at(starts)
    lines = "".join(generated).split("\n")
    line_starts = np.cumsum([0] + [len(line) + 1 for line in lines[:-1]]).tolist()
    keys = [line.split("\t", 1)[0] if "\t" in line else None for line in lines]
    expected = [display_token(t) for t in tokens]
    probs = np.zeros((len(tokens), len(VALUES)))
    failed = np.ones(len(tokens), dtype=bool)
    matcher = difflib.SequenceMatcher(None, expected, keys, autojunk=False)
    for a, b, n in matcher.get_matching_blocks():
        for i, j in zip(range(a, a + n), range(b, b + n)):
            p = _read_at(line_starts[j] + len(keys[j]) + 1, first_at, generated, tops)
            if p is not None:
                probs[i], failed[i] = p, False
    return probs, failed


# -----------------------------------------------------------------------------
# JSON: no logprobs, point predictions

JSON_SIMULATOR_INSTRUCTION = (
    "You are helping to interpret the neurons of a language model. You are given a description "
    "of the feature a neuron detects and a short text as a JSON list of tokens. Predict how "
    "strongly the neuron fires on each token, as an integer from 0 (silent) to 10 (strongest "
    'response); most activations are 0. Answer with a JSON list only: one {"token": ..., '
    '"activation": ...} object per token, in the same order, with the token copied exactly.'
)


def _json_question(explanation: str, tokens: list[str]) -> str:
    return f"Neuron behavior: {EXPLANATION_PREFIX} {explanation}.\nTokens: {json.dumps(tokens, ensure_ascii=False)}"


def json_simulation_messages(explanation: str, tokens: list[str], fewshot: list[dict]) -> list[dict]:
    """System instruction; per few-shot neuron a user turn with its tokens and the answer as
    [{"token": str, "activation": int}, ...]; the target's user turn."""
    messages = [{"role": "system", "content": JSON_SIMULATOR_INSTRUCTION}]
    for neuron in fewshot:
        answer = [{"token": t, "activation": int(v)} for t, v in zip(neuron["tokens"], neuron["activations"])]
        messages.append({"role": "user", "content": _json_question(neuron["explanation"], neuron["tokens"])})
        messages.append({"role": "assistant", "content": json.dumps(answer, ensure_ascii=False)})
    messages.append({"role": "user", "content": _json_question(explanation, tokens)})
    return messages


def _find_json_list(text: str) -> list | None:
    """The first JSON list of objects in a ```json fence, else anywhere in the text (models wrap
    answers in prose); brackets in the prose that do not start such a list are skipped."""
    decoder = json.JSONDecoder()
    for chunk in re.findall(r"```(?:json)?(.*?)```", text, re.S) + [text]:
        for m in re.finditer(r"\[", chunk):
            try:
                value, _ = decoder.raw_decode(chunk, m.start())
            except json.JSONDecodeError:
                continue
            if isinstance(value, list) and value and all(isinstance(x, dict) for x in value):
                return value
    return None


def _json_item_error(i: int, item: dict, token: str) -> str | None:
    if "token" not in item or "activation" not in item:
        return f"item {i}: missing 'token' or 'activation'"
    if item["token"] != token:
        return f"item {i}: token {item['token']!r} expected {token!r}"
    a = item["activation"]
    # bool is an int in Python; true/false is not an activation
    if isinstance(a, bool) or not isinstance(a, (int, float)) or not 0 <= a <= 10:
        return f"item {i}: activation {a!r} is not a number in 0..10"
    return None


def read_json_simulation(text: str, tokens: list[str]) -> tuple[np.ndarray, np.ndarray, str | None]:
    """Point predictions from a JSON answer. Returns (values float32 [T], NaN where failed;
    failed bool [T]; "; "-joined error messages or None). A missing list or a wrong length
    fails every token (positions cannot be trusted); a wrong token or a bad activation fails
    that item."""
    values = np.full(len(tokens), np.nan, dtype=np.float32)
    failed = np.ones(len(tokens), dtype=bool)
    items = _find_json_list(text)
    if items is None:
        return values, failed, "no JSON list of objects in the answer"
    if len(items) != len(tokens):
        return values, failed, f"expected {len(tokens)} items, got {len(items)}"
    errors = []
    for i, (item, token) in enumerate(zip(items, tokens)):
        error = _json_item_error(i, item, token)
        if error:
            errors.append(error)
        else:
            values[i], failed[i] = item["activation"], False
    return values, failed, "; ".join(errors) or None
