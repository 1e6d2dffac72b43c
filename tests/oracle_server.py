"""A real OpenAI-compatible HTTP server on loopback whose "model" is a deterministic rule-based oracle.

It follows explanations faithfully, as a capable LLM would at its best, so end-to-end tests can
check that the pipeline turns good explanations into high scores (and a shuffled control into low
ones) without any LLM on this machine. The plumbing (routes, auth, `script` misbehaviours,
`requests`, `posts`) is `openai_server.FakeOpenAIServer`'s; only the answers differ.

    with OracleServer() as server:
        client = openai.OpenAI(base_url=server.base_url, api_key="sk-test")

Requests are told apart by their system message:
- explainer (`prompts.EXPLAINER_INSTRUCTION`): `the token "X"`, X = the stripped token with the
  highest total value in the last user message's `token<TAB>value` lines;
- revision (`revision.REVISION_INSTRUCTION`): every stripped token with value >= 3 anywhere in the
  message, by total value: `the tokens "X" and "Y"`;
- JSON simulator (`remote.JSON_SIMULATOR_INSTRUCTION`): 10 for the tokens that, stripped, are quoted
  (as JSON strings) in the explanation, else 0;
- detection (`detection.DETECTION_INSTRUCTION`): 1 per excerpt holding a quoted name as a whole word;
- fuzzing (`detection.FUZZING_INSTRUCTION`): 1 per excerpt whose `<<...>>` spans are all quoted names.
Besides, the client's capability probe (no system message, "Reply with the digit 0.") is answered
"0". Anything else is a 400 naming the request. /v1/completions is a 404 and chat logprobs a 400
(a chat-only model without logprobs), so simulation falls back to the JSON method.
"""

from __future__ import annotations

import json
import re
import threading
from collections import defaultdict

from openai_server import FakeOpenAIServer, _ApiError, _Handler, _HTTPServer

from neuron_assets.method import detection, prompts, remote

MODEL_NAME = "oracle"
PROBE_MESSAGE = "Reply with the digit 0."
BEHAVIOR_PREFIX = f"Neuron behavior: {prompts.EXPLANATION_PREFIX} "
WORD = r"[0-9A-Za-z_]"  # what counts as part of a word for whole-word matching


def _revision_instruction() -> str | None:
    try:  # written alongside; the oracle works without it
        from neuron_assets.method.revision import REVISION_INSTRUCTION
    except ImportError:
        return None
    return REVISION_INSTRUCTION


# --- reading prompts -----------------------------------------------------------------------------

_ESCAPES = {"\\": "\\", "t": "\t", "n": "\n", "r": "\r"}


def unescape(text: str) -> str:
    """Undo `prompts.display_token` (also applied to excerpts)."""
    return re.sub(r"\\([\\tnr])", lambda m: _ESCAPES[m.group(1)], text)


def record_values(text: str) -> list[tuple[str, int]]:
    """(token, value) for every `token<TAB>value` line between `<start>` and `<end>` whose value is
    an integer ("unknown" lines skipped); tokens unescaped, not stripped."""
    pairs = []
    for block in re.findall(r"<start>\n(.*?)<end>", text, re.DOTALL):
        for line in block.split("\n"):
            token, tab, value = line.rpartition("\t")
            if tab and re.fullmatch(r"\d+", value):
                pairs.append((unescape(token), int(value)))
    return pairs


def _totals(pairs: list[tuple[str, int]]) -> dict[str, int]:
    """Total value per stripped token, whitespace-only tokens left out, in first-seen order."""
    total: dict[str, int] = defaultdict(int)
    for token, value in pairs:
        if token.strip():
            total[token.strip()] += value
    return total


def name_tokens(names: list[str]) -> str:
    quoted = [json.dumps(n, ensure_ascii=False) for n in names]
    if len(quoted) == 1:
        return f"the token {quoted[0]}"
    return f"the tokens {', '.join(quoted[:-1])} and {quoted[-1]}"


def quoted_names(explanation: str) -> list[str]:
    """Every JSON string literal in the explanation, stripped (empty ones dropped)."""
    names = []
    for literal in re.findall(r'"(?:[^"\\]|\\.)*"', explanation):
        try:
            name = json.loads(literal).strip()
        except json.JSONDecodeError:
            continue
        if name:
            names.append(name)
    return names


def explanation_of(text: str) -> str:
    """The explanation in the `Neuron behavior: ... find <explanation>.` line."""
    for line in text.split("\n"):
        if line.startswith(BEHAVIOR_PREFIX):
            rest = line[len(BEHAVIOR_PREFIX):]
            return rest.removesuffix(".")
    raise _ApiError(400, "oracle: no 'Neuron behavior: ...' line in the user message")


def excerpts_of(text: str) -> list[str]:
    """The texts of the `Excerpt {i}: {text}` lines, in order, still escaped."""
    return re.findall(r"^Excerpt \d+: (.*)$", text, re.MULTILINE)


def _whole_word(name: str, text: str) -> bool:
    return re.search(rf"(?<!{WORD}){re.escape(name)}(?!{WORD})", text) is not None


# --- answers -------------------------------------------------------------------------------------


def explain(user: str) -> str:
    total = _totals(record_values(user))
    if not total:
        raise _ApiError(400, "oracle: explainer request without any token<TAB>value record lines")
    best = max(total, key=lambda t: total[t])  # ties: first seen
    return name_tokens([best])


def revise(user: str) -> str:
    pairs = record_values(user)
    total = _totals(pairs)
    strong = {t.strip() for t, v in pairs if v >= 3 and t.strip()}
    names = sorted((t for t in total if t in strong), key=lambda t: -total[t])
    if not names:
        raise _ApiError(400, "oracle: revision request without any token of value >= 3")
    return name_tokens(names)


def simulate_json(user: str) -> str:
    names = set(quoted_names(explanation_of(user)))
    match = re.search(r"^Tokens: (.*)$", user, re.MULTILINE)
    try:
        tokens = json.loads(match.group(1)) if match else None
    except json.JSONDecodeError:
        tokens = None
    if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
        raise _ApiError(400, "oracle: JSON simulation request without a 'Tokens: [...]' line of strings")
    return json.dumps([{"token": t, "activation": 10 if t.strip() in names else 0} for t in tokens],
                      ensure_ascii=False)


def detect(user: str) -> str:
    names = quoted_names(explanation_of(user))
    return json.dumps([int(any(_whole_word(n, unescape(x)) for n in names)) for x in excerpts_of(user)])


def fuzz(user: str) -> str:
    names = set(quoted_names(explanation_of(user)))
    answers = []
    for excerpt in excerpts_of(user):
        spans = [unescape(s).strip() for s in re.findall(r"<<(.*?)>>", excerpt)]
        answers.append(int(bool(spans) and all(s in names for s in spans)))
    return json.dumps(answers)


def answer(messages: list[dict]) -> str:
    """The oracle's reply to a chat request (raises `_ApiError` 400 for an unknown request)."""
    system = next((m.get("content") for m in messages if m.get("role") == "system"), None)
    users = [m.get("content") for m in messages if m.get("role") == "user"]
    if not users or not isinstance(users[-1], str):
        raise _ApiError(400, "oracle: no user message with text content", param="messages")
    user = users[-1]
    if system is None and user == PROBE_MESSAGE:
        return "0"
    rules = {
        prompts.EXPLAINER_INSTRUCTION: explain,
        remote.JSON_SIMULATOR_INSTRUCTION: simulate_json,
        detection.DETECTION_INSTRUCTION: detect,
        detection.FUZZING_INSTRUCTION: fuzz,
    }
    revision = _revision_instruction()
    if revision is not None:
        rules[revision] = revise
    rule = rules.get(system)
    if rule is None:
        shown = repr(system[:80]) if isinstance(system, str) else "none"
        raise _ApiError(400, f"oracle: unknown request (system message: {shown}; user message: {user[:80]!r})")
    return rule(user)


class OracleServer(FakeOpenAIServer):
    """The rule-based oracle on 127.0.0.1 (ephemeral port): `.base_url`, `.requests` (path, body),
    plus `FakeOpenAIServer`'s `script`, `posts`, `max_in_flight` and api_key check."""

    def __init__(self, *, api_key: str | None = None, model_name: str = MODEL_NAME, only_model: bool = False):
        super().__init__(api_key=api_key, completions=False, chat_logprobs=False, model_name=model_name,
                         only_model=only_model)

    def start(self) -> OracleServer:  # no model to load
        self._httpd = _HTTPServer(("127.0.0.1", 0), _Handler)
        self._httpd.owner = self
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, name="oracle", daemon=True
        )
        self._thread.start()
        return self

    def _chat(self, body: dict) -> dict:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
            raise _ApiError(400, "'messages' must be a non-empty array of objects", param="messages")
        if body.get("logprobs"):
            raise _ApiError(400, "This model does not support logprobs.", param="logprobs")
        content = answer(messages)
        prompt_tokens = sum(len(str(m.get("content") or "").split()) for m in messages)
        completion_tokens = len(content.split())
        choice = {
            "index": 0,
            "message": {"role": "assistant", "content": content},
            "finish_reason": "stop",
            "logprobs": None,
        }
        return self._envelope("chatcmpl", "chat.completion", [choice], prompt_tokens, completion_tokens)
