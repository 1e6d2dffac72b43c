"""A real OpenAI-compatible HTTP server on loopback, serving a tiny random-weight local model.

Test infrastructure: the `openai` SDK (and anything else speaking the OpenAI wire format) talks to
it over real HTTP, so client behaviour (status codes, headers, timeouts, malformed bodies) is
exercised end to end without any network beyond 127.0.0.1.

    with FakeOpenAIServer(api_key="sk-test") as server:
        client = openai.OpenAI(base_url=server.base_url, api_key="sk-test")
        ...
        server.script(["429", "500", "slow:2.0", "malformed", "ok"])  # next POSTs misbehave
        len(server.requests)                                           # (path, body) received

Routes: GET /v1/models, POST /v1/chat/completions, POST /v1/completions (vLLM-style prompt
logprobs with echo=True). `completions=False` makes /v1/completions a 404 (like a chat-only
model); `chat_logprobs=False` makes chat requests with logprobs=True a 400 (like a model without
logprobs support).
"""

from __future__ import annotations

import functools
import json
import shutil
import tempfile
import threading
import time
import uuid
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

from neuron_assets.resources.local_llm import chat_text
from tiny_models import build_tiny_model

MODEL_NAME = "tiny-llama"
DEFAULT_MAX_TOKENS = 16
BEHAVIOURS = ("ok", "429", "500", "malformed", "drop")  # plus "slow:<seconds>" and "429:<seconds>"


@functools.lru_cache(maxsize=4)
def _load(model_dir: str):
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return model, tokenizer


class _ApiError(Exception):
    """An OpenAI-style error answer."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", code=None, param=None):
        super().__init__(message)
        self.status = status
        self.body = {"error": {"message": message, "type": type_, "param": param, "code": code}}


class _Engine:
    """Greedy / sampled generation and logprobs from a causal LM, one request at a time."""

    def __init__(self, model, tokenizer, digit_bias: float = 0.0):
        self.model = model
        self.tokenizer = tokenizer
        # Like OpenAI's logit_bias, on every request: a random-weight model then writes digits,
        # as a real simulator does after "token<TAB>", so simulations have values to read.
        self.digit_ids = [tokenizer(str(d), add_special_tokens=False)["input_ids"][0] for d in range(10)]
        self.digit_bias = digit_bias
        self.lock = threading.Lock()  # the model is shared; requests are still accepted concurrently
        eos = tokenizer.eos_token_id
        self.eos_ids = {eos} if eos is not None else set()
        self.max_positions = getattr(model.config, "max_position_embeddings", 4096)
        # decoded once: a prompt's logprobs name thousands of tokens
        self.texts = [tokenizer.decode([i]) for i in range(max(len(tokenizer), model.config.vocab_size))]

    def token_text(self, token_id: int) -> str:
        return self.texts[token_id] if 0 <= token_id < len(self.texts) else self.tokenizer.decode([token_id])

    @torch.inference_mode()
    def _log_probs(self, ids: list[int]) -> torch.Tensor:
        """[len(ids), V] log-probabilities of the next token after each position."""
        logits = self.model(input_ids=torch.tensor([ids])).logits[0].float()
        logits[:, self.digit_ids] += self.digit_bias
        return torch.log_softmax(logits, dim=-1)

    def _top(self, logp_row: torch.Tensor, k: int) -> list[tuple[int, float]]:
        if k <= 0:
            return []
        values, indices = torch.topk(logp_row, k=min(k, logp_row.shape[-1]))
        return [(int(i), float(v)) for v, i in zip(values, indices)]

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text)["input_ids"]

    def generate(self, ids: list[int], max_tokens: int, temperature: float, seed, top_k: int):
        """Generate up to `max_tokens` tokens after `ids`.

        Returns (new ids, per-token logprob, per-token top-k list, finish_reason). Logprobs are the
        model's own distribution (before temperature), as OpenAI and vLLM report them.
        """
        generator = torch.Generator().manual_seed(int(seed)) if seed is not None else None
        new, logprobs, tops = [], [], []
        finish = "length"
        with self.lock, torch.inference_mode():
            cache = DynamicCache()  # incremental decoding: one token per step, not the whole prompt again
            step = list(ids)
            for _ in range(max_tokens):
                if len(ids) + len(new) >= self.max_positions:
                    break
                logits = self.model(input_ids=torch.tensor([step]), cache=cache, use_cache=True).logits[0, -1].float()
                logits[self.digit_ids] += self.digit_bias
                row = torch.log_softmax(logits, dim=-1)
                if temperature and temperature > 0:
                    probs = torch.softmax(row / temperature, dim=-1)
                    token = int(torch.multinomial(probs, 1, generator=generator))
                else:
                    token = int(torch.argmax(row))
                new.append(token)
                logprobs.append(float(row[token]))
                tops.append(self._top(row, top_k))
                step = [token]
                if token in self.eos_ids:
                    finish = "stop"
                    break
        return new, logprobs, tops, finish

    def prompt_logprobs(self, ids: list[int], k: int):
        """Per prompt token: its logprob given the tokens before it (None for the first) and the
        top-k alternatives there (None for the first)."""
        with self.lock:
            logp = self._log_probs(ids)
        chosen = logp[torch.arange(len(ids) - 1), torch.tensor(ids[1:], dtype=torch.long)].tolist()
        tops: list[list[tuple[int, float]] | None] = [None]
        if k > 0:
            values, indices = torch.topk(logp[:-1], k=min(k, logp.shape[-1]), dim=-1)
            tops += [list(zip(i, v)) for i, v in zip(indices.tolist(), values.tolist())]
        else:
            tops += [[] for _ in ids[1:]]
        return [None, *chosen], tops


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: "_HTTPServer"
    # A response's headers and body go out in two sends: with Nagle's algorithm the body would wait
    # for the client's delayed ACK (40 ms on Linux) on every request. Real servers (uvicorn, vLLM)
    # set TCP_NODELAY too.
    disable_nagle_algorithm = True

    def log_message(self, format, *args):  # quiet
        pass

    # -- plumbing

    def _send(self, status: int, body: bytes, headers: dict | None = None, content_type="application/json"):
        try:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(body)
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            # The client gave up (a timeout test): nothing left to answer.
            self.close_connection = True

    def _json(self, status: int, obj, headers: dict | None = None):
        self._send(status, json.dumps(obj).encode(), headers)

    def _authorised(self) -> bool:
        key = self.server.owner.api_key
        if key is None:
            return True
        if self.headers.get("Authorization") == f"Bearer {key}":
            return True
        self._json(401, _ApiError(401, "Incorrect API key provided.", code="invalid_api_key").body)
        return False

    # -- routes

    def do_GET(self):
        owner = self.server.owner
        owner._record(self.path, None)
        if not self._authorised():
            return
        if self.path.rstrip("/") == "/v1/models":
            self._json(200, {"object": "list", "data": [
                {"id": owner.model_name, "object": "model", "created": owner.created, "owned_by": "tests"}
            ]})
        else:
            self._json(404, _ApiError(404, f"no route {self.path}").body)

    def do_POST(self):
        owner = self.server.owner
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        try:
            body = json.loads(raw) if raw else {}
        except ValueError:
            body = None
        owner._record(self.path, body)
        owner._enter()
        try:
            if not self._authorised():
                return
            behaviour = owner._next_behaviour()
            if behaviour.startswith("slow:"):
                time.sleep(float(behaviour.split(":", 1)[1]))
            elif behaviour == "429" or behaviour.startswith("429:"):
                error = _ApiError(429, "Rate limit reached for requests", type_="requests", code="rate_limit_exceeded")
                return self._json(429, error.body, headers={"Retry-After": behaviour.partition(":")[2] or "0"})
            elif behaviour == "drop":  # the connection closes mid-response
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", "1000")
                self.end_headers()
                self.wfile.write(b'{"id": "chatcmpl-dropped", "choi')
                self.wfile.flush()
                self.close_connection = True
                return
            elif behaviour == "500":
                return self._json(500, _ApiError(500, "The server had an error", type_="server_error").body)
            elif behaviour == "malformed":
                return self._send(200, b'{"id": "cmpl-broken", "choices": [')
            if body is None or not isinstance(body, dict):
                return self._json(400, _ApiError(400, "We could not parse the JSON body of your request.").body)
            if owner.only_model and body.get("model") != owner.model_name:
                error = _ApiError(404, f"The model `{body.get('model')}` does not exist or you do not have access to it.",
                                  code="model_not_found")
                return self._json(404, error.body)
            path = self.path.rstrip("/")
            try:
                if path == "/v1/chat/completions":
                    return self._json(200, owner._chat(body))
                if path == "/v1/completions":
                    return self._json(200, owner._completions(body))
                raise _ApiError(404, f"Invalid URL (POST {self.path})")
            except _ApiError as error:
                return self._json(error.status, error.body)
            except Exception as error:  # a bug in the fake: report it like a server would
                return self._json(500, _ApiError(500, f"{type(error).__name__}: {error}", type_="server_error").body)
        finally:
            owner._leave()


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    owner: "FakeOpenAIServer"

    def handle_error(self, request, client_address):
        pass  # dropped connections (client timeouts) are expected in tests


class FakeOpenAIServer:
    """An OpenAI-compatible server on 127.0.0.1 (ephemeral port) backed by a tiny local model.

    model_dir: a directory from `tiny_models.build_tiny_model` to serve; None builds a tiny Llama
    (max_positions=4096) in a temporary directory removed on exit.
    """

    def __init__(
        self,
        model_dir=None,
        *,
        api_key: str | None = None,
        completions: bool = True,
        chat_logprobs: bool = True,
        model_name: str = MODEL_NAME,
        only_model: bool = False,
        digit_bias: float = 0.0,
    ):
        self.api_key = api_key
        self.completions_enabled = completions
        self.chat_logprobs_enabled = chat_logprobs
        self.model_name = model_name
        self.only_model = only_model  # other model names are a 404 model_not_found, as OpenAI's
        self.digit_bias = digit_bias
        self.created = int(time.time())
        self._model_dir = model_dir
        self._tmp: str | None = None
        self._lock = threading.Lock()
        self._script: deque[str] = deque()
        self.requests: list[tuple[str, dict | None]] = []
        self.times: list[float] = []  # time.monotonic() of each request, as it arrived
        self.in_flight = 0
        self.max_in_flight = 0
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.engine: _Engine | None = None

    # -- lifecycle

    def start(self) -> "FakeOpenAIServer":
        if self._model_dir is None:
            self._tmp = tempfile.mkdtemp(prefix="fake-openai-")
            self._model_dir = build_tiny_model("llama", self._tmp, max_positions=4096)
        self.engine = _Engine(*_load(str(self._model_dir)), digit_bias=self.digit_bias)
        self._httpd = _HTTPServer(("127.0.0.1", 0), _Handler)
        self._httpd.owner = self
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, name="fake-openai", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    def __enter__(self) -> "FakeOpenAIServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def port(self) -> int:
        assert self._httpd is not None, "server not started"
        return self._httpd.server_address[1]

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    # -- test controls

    def script(self, behaviours: list[str]) -> None:
        """Queue behaviours for the next POST requests, in order: "ok", "429" (with Retry-After: 0),
        "429:<seconds>" (with that Retry-After), "500", "slow:<seconds>" (then answer normally),
        "malformed" (200 with a body that is not JSON), "drop" (the connection closes mid-body)."""
        for b in behaviours:
            timed = b.partition(":")[0] in ("slow", "429") and b.partition(":")[2]
            if b not in BEHAVIOURS and not (timed and float(b.partition(":")[2]) >= 0):
                raise ValueError(f"unknown behaviour {b!r}")
        with self._lock:
            self._script.extend(behaviours)

    def posts(self, path_suffix: str = "") -> list[dict | None]:
        """Bodies of the POST requests received whose path ends with `path_suffix`."""
        with self._lock:
            return [body for path, body in self.requests if body is not None and path.endswith(path_suffix)]

    def most_in_window(self, seconds: float) -> int:
        """The most requests that arrived within any `seconds` of each other."""
        with self._lock:
            times = sorted(self.times)
        first, most = 0, 0
        for last, t in enumerate(times):
            while t - times[first] > seconds:
                first += 1
            most = max(most, last - first + 1)
        return most

    def _record(self, path: str, body) -> None:
        with self._lock:
            self.requests.append((path, body))
            self.times.append(time.monotonic())

    def _next_behaviour(self) -> str:
        with self._lock:
            return self._script.popleft() if self._script else "ok"

    def _enter(self) -> None:
        with self._lock:
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)

    def _leave(self) -> None:
        with self._lock:
            self.in_flight -= 1

    # -- endpoints

    def _envelope(self, prefix: str, obj: str, choices: list, prompt_tokens: int, completion_tokens: int) -> dict:
        return {
            "id": f"{prefix}-{uuid.uuid4().hex[:24]}",
            "object": obj,
            "created": int(time.time()),
            "model": self.model_name,
            "choices": choices,
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
        }

    @staticmethod
    def _max_tokens(body: dict) -> int:
        value = body.get("max_completion_tokens", body.get("max_tokens"))
        value = DEFAULT_MAX_TOKENS if value is None else value
        if not isinstance(value, int) or value < 0:
            raise _ApiError(400, f"Invalid max_tokens: {value!r}", param="max_tokens")
        return value

    def _chat(self, body: dict) -> dict:
        engine = self.engine
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise _ApiError(400, "'messages' must be a non-empty array", param="messages")
        want_logprobs = bool(body.get("logprobs"))
        if want_logprobs and not self.chat_logprobs_enabled:
            raise _ApiError(400, "This model does not support logprobs.", param="logprobs")
        top_k = int(body.get("top_logprobs") or 0) if want_logprobs else 0
        if top_k > 20:
            raise _ApiError(400, "top_logprobs must be at most 20", param="top_logprobs")
        max_tokens = self._max_tokens(body)
        if max_tokens < 1:
            raise _ApiError(400, "max_tokens must be at least 1", param="max_tokens")
        ids = engine.encode(chat_text(engine.tokenizer, messages))
        new, logprobs, tops, finish = engine.generate(
            ids, max_tokens, float(body.get("temperature", 1.0)), body.get("seed"), top_k
        )
        content_ids = [t for t in new if t not in engine.eos_ids]
        choice = {
            "index": 0,
            "message": {"role": "assistant", "content": engine.tokenizer.decode(content_ids)},
            "finish_reason": finish,
            "logprobs": None,
        }
        if want_logprobs:
            def entry(token_id, logprob):
                text = engine.token_text(token_id)
                return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

            choice["logprobs"] = {
                "content": [
                    {**entry(t, lp), "top_logprobs": [entry(i, v) for i, v in top]}
                    for t, lp, top in zip(new, logprobs, tops)
                ],
                "refusal": None,
            }
        return self._envelope("chatcmpl", "chat.completion", [choice], len(ids), len(new))

    def _completions(self, body: dict) -> dict:
        if not self.completions_enabled:
            raise _ApiError(
                404,
                "This is a chat model and not supported in the v1/completions endpoint. "
                "Did you mean to use v1/chat/completions?",
            )
        engine = self.engine
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise _ApiError(400, "'prompt' must be a string", param="prompt")
        echo = bool(body.get("echo"))
        k = body.get("logprobs")
        if k is not None and (not isinstance(k, int) or k < 0 or k > 20):
            raise _ApiError(400, "logprobs must be an integer between 0 and 20", param="logprobs")
        max_tokens = self._max_tokens(body)
        if max_tokens == 0 and not echo:
            raise _ApiError(400, "max_tokens must be at least 1 unless echo is set", param="max_tokens")
        ids = engine.encode(prompt)
        new, gen_logprobs, gen_tops, finish = engine.generate(
            ids, max_tokens, float(body.get("temperature", 1.0)), body.get("seed"), k or 0
        )
        generated_text = engine.tokenizer.decode([t for t in new if t not in engine.eos_ids])
        text = (prompt if echo else "") + generated_text
        logprobs = None
        if k is not None:
            tokens: list[int] = []
            token_logprobs: list = []
            tops: list = []
            if echo:
                p_logprobs, p_tops = engine.prompt_logprobs(ids, k)
                tokens += ids
                token_logprobs += p_logprobs
                tops += p_tops
            tokens += new
            token_logprobs += gen_logprobs
            tops += gen_tops
            strings = [engine.token_text(t) for t in tokens]
            offsets, position = [], 0
            for s in strings:
                offsets.append(position)
                position += len(s)

            texts = engine.texts

            def as_dict(top):
                # `top` is sorted best first; tokens with the same text keep the best value, which
                # inserting in reverse order gives (the last write wins).
                if top is None:
                    return None
                return {texts[token_id]: value for token_id, value in reversed(top)}

            logprobs = {
                "tokens": strings,
                "token_logprobs": token_logprobs,
                "top_logprobs": [as_dict(t) for t in tops],
                "text_offset": offsets,
            }
        choice = {
            "index": 0,
            "text": text,
            "logprobs": logprobs,
            "finish_reason": finish if max_tokens > 0 else "length",
        }
        return self._envelope("cmpl", "text_completion", [choice], len(ids), len(new))
