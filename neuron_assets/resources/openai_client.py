"""A thrifty, faithful client for any OpenAI-compatible endpoint (OpenAI, vLLM, Ollama, llama.cpp).

`OpenAIEndpoint` wraps the real `openai` SDK and adds what a long, expensive pipeline needs:

- the persistent, content-addressed response cache (resources/response_cache.py, local path or
  s3://, shared with the local backend): an identical request (same base_url, model, endpoint and parameters) is answered from disk with
  zero HTTP requests; only successful responses are cached; the API key is never part of the key
  nor of anything written;
- per-process limits shared by every endpoint object with the same base_url: requests/minute and
  tokens/minute token buckets, and a maximum number of requests in flight;
- our own retries (the SDK's are switched off): exponential backoff with full jitter on 429, 5xx,
  timeouts, connection errors and unparseable bodies; a 429 with Retry-After pauses every request
  to that base_url instead and uses up no retry; other 4xx fail at once; persistent failure raises
  `LLMRequestError` naming status, endpoint and model; an endpoint without the model named raises
  `WrongModelError` naming the setting to change;
- token and cost accounting from an editable price table (resources/prices.json);
- `probe()`: which simulation method the endpoint supports (docs/method.md, Simulation).

No Dagster import: the Dagster resource wraps this class.
"""

from __future__ import annotations

import email.utils
import json
import logging
import math
import random
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import openai
from upath import UPath

from neuron_assets.resources.response_cache import ResponseCache, canonical
from neuron_assets.stages.results import SetupError, Usage

log = logging.getLogger(__name__)

DEFAULT_PRICES_PATH = Path(__file__).resolve().parents[2] / "resources" / "prices.json"
MAX_RETRY_AFTER_S = 120.0  # a server asking for longer than this is clamped to it
MAX_THROTTLED_S = 900.0  # a request throttled (429 with Retry-After) for longer than this fails

ENDPOINTS = {"chat": "chat/completions", "completions": "completions"}  # our names -> their paths
# Statuses that mean "this endpoint / model does not offer that feature" during a probe.
UNSUPPORTED_STATUSES = {400, 404, 405, 422, 501}


@dataclass(frozen=True)
class Reply:
    """An endpoint's response body (plain JSON, scrubbed of the key) and what it cost."""

    body: dict
    usage: Usage


class LLMRequestError(RuntimeError):
    """A request to an LLM endpoint failed for good (not retryable, or retries exhausted)."""

    def __init__(self, message: str, *, status: int | None, endpoint: str, model: str, attempts: int,
                 code: str | None = None):
        super().__init__(message)
        self.status = status
        self.endpoint = endpoint
        self.model = model
        self.attempts = attempts
        self.code = code


class WrongModelError(SetupError):
    """The endpoint says it has no such model: a setting to fix, not a failure of one request (so
    not an LLMRequestError, which the stages turn into its unit's error row)."""


class _MalformedResponse(Exception):
    """The endpoint answered 2xx with a body that is not a valid response object."""


# ----------------------------------------------------------------------------- prices


def load_prices(path=None) -> dict:
    """The price table: model name -> {"input": USD per 1M tokens, "output": USD per 1M tokens}
    (a bare number means the same price for both); keys starting with "_" are comments."""
    if path is None:
        if not DEFAULT_PRICES_PATH.exists():  # an installed wheel without the repo's resources/
            log.warning("no price table at %s: LLM costs are reported as 0", DEFAULT_PRICES_PATH)
            return {}
        path = DEFAULT_PRICES_PATH
    table = json.loads(UPath(path).read_text())
    return {k: v for k, v in table.items() if not str(k).startswith("_")}


def _rates(entry) -> tuple[float, float]:
    if isinstance(entry, (int, float)):
        return float(entry), float(entry)
    return float(entry.get("input", 0.0)), float(entry.get("output", 0.0))


def price(model: str, tokens_in: int, tokens_out: int, prices: dict | None) -> float:
    """Cost in USD of a request. The model is looked up exactly, then by the longest price-table
    key it starts with ("gpt-4o-mini-2024-07-18" -> "gpt-4o-mini"), then "default"; unknown -> 0."""
    prices = prices or {}
    entry = prices.get(model)
    if entry is None:
        candidates = [k for k in prices if not k.startswith("_") and k != "default" and model.startswith(k)]
        if candidates:
            entry = prices[max(candidates, key=len)]
    if entry is None:
        entry = prices.get("default", 0)
    rate_in, rate_out = _rates(entry)
    return (tokens_in * rate_in + tokens_out * rate_out) / 1_000_000


# ----------------------------------------------------------------------------- shared limits


class _Bucket:
    """Token bucket refilled at `per_minute / 60` per second, holding at most one second's worth
    (at least 1). A reservation may overdraw it; later callers then wait for the refill, which
    paces requests smoothly instead of bursting a minute's budget at once."""

    def __init__(self, per_minute: float, now: float | None = None):
        self.per_minute = float(per_minute)
        self.rate = self.per_minute / 60.0
        self.capacity = max(1.0, self.rate)
        self.level = self.capacity
        self.stamp = time.monotonic() if now is None else now

    def _refill(self, now: float) -> None:
        self.level = min(self.capacity, self.level + max(0.0, now - self.stamp) * self.rate)
        self.stamp = max(self.stamp, now)

    def reserve(self, cost: float, now: float) -> float:
        """Take `cost` now; return how long the caller must wait before sending."""
        self._refill(now)
        self.level -= cost
        return 0.0 if self.level >= 0 else -self.level / self.rate

    def refund(self, amount: float, now: float) -> None:
        self._refill(now)
        self.level = min(self.capacity, self.level + amount)


class _HostLimits:
    """Rate and concurrency limits for one base_url, shared by every endpoint object in the process.
    When several objects configure the same base_url, the most restrictive non-zero limit wins."""

    def __init__(self):
        self.lock = threading.Lock()
        self.slots_free = threading.Condition(self.lock)
        self.requests: _Bucket | None = None
        self.tokens: _Bucket | None = None
        self.max_concurrency = 0  # 0 = unlimited
        self.in_flight = 0
        self.paused_until = 0.0  # a 429's Retry-After holds back every request to this base_url

    def configure(self, requests_per_minute: int, tokens_per_minute: int, max_concurrency: int) -> None:
        with self.lock:
            if requests_per_minute and (self.requests is None or requests_per_minute < self.requests.per_minute):
                self.requests = _Bucket(requests_per_minute)
            if tokens_per_minute and (self.tokens is None or tokens_per_minute < self.tokens.per_minute):
                self.tokens = _Bucket(tokens_per_minute)
            if max_concurrency and (not self.max_concurrency or max_concurrency < self.max_concurrency):
                self.max_concurrency = max_concurrency

    def pause(self, seconds: float) -> None:
        """Hold back every request to this base_url for `seconds` from now (a server's Retry-After)."""
        with self.lock:
            self.paused_until = max(self.paused_until, time.monotonic() + seconds)

    def wait_rate(self, estimated_tokens: float) -> float:
        """Wait out a pause, then reserve one request and `estimated_tokens` tokens; sleep as long as
        needed. Returns the wait."""
        with self.lock:
            now = time.monotonic()
            wait = max(0.0, self.paused_until - now)
            if self.requests is not None:
                wait = max(wait, self.requests.reserve(1, now))
            if self.tokens is not None:
                wait = max(wait, self.tokens.reserve(estimated_tokens, now))
        if wait > 0:
            time.sleep(wait)
        return wait

    def settle_tokens(self, estimated: float, actual: float) -> None:
        """Correct the token reservation with the usage the server reported."""
        with self.lock:
            if self.tokens is not None and actual >= 0:
                self.tokens.refund(estimated - actual, time.monotonic())

    def acquire_slot(self) -> None:
        with self.slots_free:
            while self.max_concurrency and self.in_flight >= self.max_concurrency:
                self.slots_free.wait()
            self.in_flight += 1

    def release_slot(self) -> None:
        with self.slots_free:
            self.in_flight -= 1
            self.slots_free.notify()


_REGISTRY_LOCK = threading.Lock()
_LIMITS: dict[str, _HostLimits] = {}
# Identical requests in flight at the same time wait for the first one and then hit the cache.
_INFLIGHT: dict[str, list] = {}


def _limits_for(base_url: str) -> _HostLimits:
    with _REGISTRY_LOCK:
        limits = _LIMITS.get(base_url)
        if limits is None:
            limits = _LIMITS[base_url] = _HostLimits()
        return limits


def reset_shared_limits() -> None:
    """Forget every base_url's shared limits (tests; a process normally keeps them for its life)."""
    with _REGISTRY_LOCK:
        _LIMITS.clear()


def _redact_url(url: str) -> str:
    """The URL without any user:password part."""
    parts = urlsplit(url)
    if parts.username or parts.password:
        host = parts.hostname or ""
        if parts.port:
            host += f":{parts.port}"
        parts = parts._replace(netloc=host)
    return urlunsplit(parts)


# ----------------------------------------------------------------------------- the endpoint


class OpenAIEndpoint:
    """One model behind one OpenAI-compatible base_url, with cache, limits, retries and accounting."""

    def __init__(
        self,
        base_url: str | None,
        api_key: str | None,
        model: str,
        cache_root: str | None = None,
        requests_per_minute: int = 0,
        tokens_per_minute: int = 0,
        max_concurrency: int = 4,
        timeout_s: float = 60.0,
        max_retries: int = 5,
        prices: dict | None = None,
        *,
        backoff_base_s: float = 0.5,
        backoff_cap_s: float = 20.0,
        model_setting: str = "the model name",
    ):
        self._api_key = api_key or None
        self.client = openai.OpenAI(base_url=base_url, api_key=api_key or "unused", timeout=timeout_s, max_retries=0)
        # The SDK resolves a None base_url (OPENAI_BASE_URL or api.openai.com); key on what it uses.
        self.base_url = _redact_url(str(self.client.base_url).rstrip("/"))
        self.model = model
        self.model_setting = model_setting  # what a user sets to name another model
        self.cache = ResponseCache(cache_root, scrub=self._scrub)
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.backoff_base_s = backoff_base_s
        self.backoff_cap_s = backoff_cap_s
        if prices is None:
            prices = load_prices()
        self.prices = {k: v for k, v in prices.items() if not str(k).startswith("_")}
        self.limits = _limits_for(self.base_url)
        self.limits.configure(requests_per_minute, tokens_per_minute, max_concurrency)
        self._stats_lock = threading.Lock()
        self.stats = {
            "requests": 0, "cache_hits": 0, "cache_misses": 0, "retries": 0,
            "tokens_in": 0, "tokens_out": 0, "cost_usd": 0.0,
        }

    def __repr__(self) -> str:  # never the key
        return f"OpenAIEndpoint(base_url={self.base_url!r}, model={self.model!r}, cache_root={str(self.cache.root)!r})"

    # -- public API

    def chat(self, messages: list[dict], **params) -> Reply:
        """POST /chat/completions: the response body and its usage."""
        return self._call("chat", {"messages": messages, **params})

    def completion(self, prompt: str, **params) -> Reply:
        """POST /completions (legacy; e.g. echo=True, logprobs=5, max_tokens=0 for prompt logprobs)."""
        return self._call("completions", {"prompt": prompt, **params})

    def probe(self) -> str:
        """The best simulation method this endpoint and model support:
        "all_at_once" (prompt logprobs from /completions with echo), "chat_logprobs" (generation
        logprobs from chat) or "json" (plain chat). An endpoint that cannot be reached, rejects the
        key, or cannot even answer a plain chat raises LLMRequestError."""
        text = "The cat sat on the mat.\tunknown"
        try:
            response = self.completion(text, echo=True, logprobs=1, max_tokens=0, temperature=0)
            if _has_prompt_logprobs(response.body, text):
                return "all_at_once"
        except LLMRequestError as error:
            if error.status not in UNSUPPORTED_STATUSES:
                raise
        messages = [{"role": "user", "content": "Reply with the digit 0."}]
        try:
            response = self.chat(messages, logprobs=True, top_logprobs=5, max_tokens=1, temperature=0)
            content = ((response.body.get("choices") or [{}])[0].get("logprobs") or {}).get("content")
            if content:
                return "chat_logprobs"
        except LLMRequestError as error:
            if error.status not in UNSUPPORTED_STATUSES:
                raise
        # Plain chat must work, or the endpoint / model name is wrong: fail loudly, not "json".
        self.chat(messages, max_tokens=1, temperature=0)
        return "json"

    # -- cache

    def cache_key(self, endpoint: str, request: dict) -> str:
        """sha256 of the canonical request: backend, base_url, model, endpoint and parameters."""
        return ResponseCache.key({"backend": "openai", "base_url": self.base_url, "model": self.model,
                                  "endpoint": endpoint, "params": request})

    # -- the request path

    def _call(self, endpoint: str, request: dict) -> Reply:
        key = self.cache_key(endpoint, request)
        if self.cache.root is None:
            return self._fetch(endpoint, request, key)
        with _REGISTRY_LOCK:
            entry = _INFLIGHT.setdefault(key, [threading.Lock(), 0])
            entry[1] += 1
        try:
            with entry[0]:
                cached = self.cache.get(key)
                if cached is not None:
                    with self._stats_lock:
                        self.stats["cache_hits"] += 1
                    return self._annotate(cached, cache_hit=True)
                return self._fetch(endpoint, request, key)
        finally:
            with _REGISTRY_LOCK:
                entry[1] -= 1
                if entry[1] == 0:
                    _INFLIGHT.pop(key, None)

    def _fetch(self, endpoint: str, request: dict, key: str) -> Reply:
        with self._stats_lock:
            self.stats["cache_misses"] += 1
        response = self._request_with_retries(endpoint, request)
        self.cache.put(key, response, backend="openai", base_url=self.base_url, model=self.model,
                       endpoint=endpoint, request=request)
        return self._annotate(response, cache_hit=False, count=True)

    def _annotate(self, response: dict, cache_hit: bool, count: bool = False) -> Reply:
        usage = response.get("usage") or {}
        tokens_in = int(usage.get("prompt_tokens") or 0)
        tokens_out = int(usage.get("completion_tokens") or 0)
        cost = 0.0 if cache_hit else price(self.model, tokens_in, tokens_out, self.prices)
        if count:
            with self._stats_lock:
                self.stats["tokens_in"] += tokens_in
                self.stats["tokens_out"] += tokens_out
                self.stats["cost_usd"] += cost
        # Every response is a fresh parse (of the scrubbed body, or of the scrubbed cache file): no copy needed.
        return Reply(response, Usage(tokens_in, tokens_out, cost, cache_hit))

    def _send(self, endpoint: str, request: dict) -> dict:
        # The SDK's plain POST (its auth, headers, timeout and error types), the body as text, parsed
        # as plain JSON: the typed methods' per-field transform of the request and the typed objects
        # of a response (thousands of logprobs) cost more client CPU than the request itself.
        text = self.client.post(f"/{ENDPOINTS[endpoint]}", cast_to=str, body={"model": self.model, **request})
        try:
            response = json.loads(self._scrub(text))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise _MalformedResponse(f"response is not a JSON object: {text[:200]!r}") from None
        if not isinstance(response, dict):
            raise _MalformedResponse(f"response is not a JSON object: {str(response)[:200]!r}")
        if not isinstance(response.get("choices"), list) or not response["choices"]:
            raise _MalformedResponse("response has no choices")
        return response

    def _estimate_tokens(self, request: dict) -> float:
        max_tokens = request.get("max_completion_tokens", request.get("max_tokens")) or 0
        return len(canonical(request)) / 4 + max_tokens

    def _request_with_retries(self, endpoint: str, request: dict) -> dict:
        url = f"{self.base_url}/{ENDPOINTS[endpoint]}"
        estimate = self._estimate_tokens(request)
        attempt = failures = 0
        throttled = 0.0  # seconds this request was held back by 429s that said for how long
        while True:
            attempt += 1
            self.limits.wait_rate(estimate)
            self.limits.acquire_slot()
            with self._stats_lock:
                self.stats["requests"] += 1
            response = status = retry_after = code = None
            try:
                response = self._send(endpoint, request)
            except openai.APITimeoutError:
                reason, retryable = f"timed out after {self.timeout_s:g} s", True
            except openai.APIConnectionError as error:
                cause = error.__cause__ or error.__context__
                detail = f"{type(cause).__name__}: {cause}" if cause else str(error)
                reason, retryable = f"connection error ({detail})", True
            except openai.APIStatusError as error:
                status = error.status_code
                retry_after = _retry_after(error.response.headers)
                code = _error_code(error)
                reason = error.message  # "Error code: 429 - <the server's message>"
                retryable = status == 429 or status >= 500
                if status == 429 and code == "insufficient_quota":  # billing, not a rate: waiting won't help
                    retryable = False
                if _no_such_model(status, code, reason):
                    raise WrongModelError(
                        f"{self.base_url} has no model {self.model!r} ({self._scrub(reason)}): set "
                        f"{self.model_setting} to a model this endpoint serves (GET {self.base_url}/models "
                        f"lists them)") from None
            except (_MalformedResponse, json.JSONDecodeError, openai.APIResponseValidationError) as error:
                reason, retryable = f"malformed response ({type(error).__name__}: {error})", True
            finally:
                self.limits.release_slot()
            if response is not None:
                usage = response.get("usage") or {}
                if usage:
                    actual = (usage.get("prompt_tokens") or 0) + (usage.get("completion_tokens") or 0)
                    self.limits.settle_tokens(estimate, actual)
                return response
            reason = self._scrub(reason)
            # A throttling server that says how long to wait slows every request to it, and is no
            # failure: it does not use up the retries, only a budget of time.
            throttling = status == 429 and retryable and retry_after is not None and math.isfinite(retry_after)
            failures += not throttling
            if not retryable or failures > self.max_retries or throttled > MAX_THROTTLED_S:
                what = ("not retryable" if not retryable else f"throttled for {throttled:.0f} s"
                        if throttled > MAX_THROTTLED_S else f"gave up after {attempt} attempt{'s' if attempt > 1 else ''}")
                raise LLMRequestError(
                    f"{endpoint} request failed: {f'status {status}' if status is not None else 'no HTTP status'} "
                    f"({reason}); endpoint POST {url}; model {self.model!r}; {what}",
                    status=status, endpoint=url, model=self.model, attempts=attempt, code=code,
                )
            delay = self._backoff(failures, retry_after)
            if throttling:
                self.limits.pause(delay)
                throttled += max(delay, 1.0)  # a Retry-After of 0, over and over, ends too
            with self._stats_lock:
                self.stats["retries"] += 1
            then = (f"the endpoint throttles: every request to it waits {delay:.2f} s" if throttling
                    else f"retry {failures}/{self.max_retries} in {delay:.2f} s")
            log.warning("%s request to %s (model %s) failed: %s; %s", endpoint, url, self.model, reason, then)
            if not throttling:
                time.sleep(delay)

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        """Full jitter: uniform(0, min(cap, base * 2^(attempt-1))); a server's Retry-After wins."""
        if retry_after is not None and math.isfinite(retry_after) and retry_after >= 0:
            return min(retry_after, MAX_RETRY_AFTER_S)
        return random.uniform(0, min(self.backoff_cap_s, self.backoff_base_s * 2 ** (attempt - 1)))

    def _scrub(self, text: str) -> str:
        if self._api_key and self._api_key in text:
            text = text.replace(self._api_key, "***")
        return text


def _retry_after(headers) -> float | None:
    """Seconds from `retry-after-ms` (OpenAI) or `retry-after` (seconds or an HTTP date)."""
    if headers is None:
        return None
    for name, divisor in (("retry-after-ms", 1000.0), ("retry-after", 1.0)):
        value = headers.get(name)
        if value is None:
            continue
        try:
            return float(value) / divisor
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value:
        try:
            parsed = email.utils.parsedate_tz(value)
            if parsed is not None:
                return max(0.0, email.utils.mktime_tz(parsed) - time.time())
        except (TypeError, ValueError, OverflowError):
            return None
    return None


def _error_code(error: openai.APIStatusError) -> str | None:
    body = error.body
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict) and inner.get("code") is not None:
            return str(inner["code"])
    return error.code


_MODEL_MISSING = re.compile(r"model\b.*\b(does not exist|not found|no such)", re.I | re.S)


def _no_such_model(status: int, code: str | None, message: str) -> bool:
    """Does an error response say the endpoint has no such model (OpenAI's code, vLLM's and
    Ollama's wording)?"""
    return status in (400, 404) and (code == "model_not_found" or bool(_MODEL_MISSING.search(message)))


_WS = re.compile(r"\s+")


def _has_prompt_logprobs(response: dict, prompt: str) -> bool:
    """Does a /completions echo answer carry logprobs for the prompt's tokens?"""
    choices = response.get("choices") or []
    logprobs = (choices[0].get("logprobs") if choices else None) or {}
    tokens = logprobs.get("tokens") or []
    values = logprobs.get("token_logprobs") or []
    if len(tokens) < 2 or len(values) != len(tokens):
        return False
    if sum(v is not None for v in values) < len(values) - 1:
        return False
    echoed = _WS.sub("", "".join(t for t in tokens if isinstance(t, str)))
    return _WS.sub("", prompt) in echoed
