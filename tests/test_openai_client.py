"""OpenAIEndpoint through the real `openai` SDK against a real HTTP server on loopback.

The server (tests/openai_server.py) serves a tiny random-weight Llama, so every answer is a real
model output with real logprobs; faults (429, 500, slow, malformed bodies) are scripted per request.
"""

import json
import socket
import threading
import time

import pytest

from neuron_assets.resources import openai_client
from neuron_assets.resources.openai_client import LLMRequestError, OpenAIEndpoint, load_prices, price
from openai_server import MODEL_NAME, FakeOpenAIServer
from tiny_models import build_tiny_model

KEY = "sk-test-SECRET-0123456789abcdef"
PRICES = {"tiny-llama": {"input": 1.0, "output": 2.0}, "default": 0}
FAST = dict(backoff_base_s=0.01, backoff_cap_s=0.05)  # keep retry sleeps short
CHAT = [{"role": "user", "content": "Name a Python keyword."}]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_model("llama", tmp_path_factory.mktemp("tiny-llama"), max_positions=4096)


@pytest.fixture(autouse=True)
def fresh_limits():
    openai_client.reset_shared_limits()
    yield
    openai_client.reset_shared_limits()


@pytest.fixture
def server(model_dir):
    with FakeOpenAIServer(model_dir, api_key=KEY) as s:
        yield s


def endpoint(server, **kwargs) -> OpenAIEndpoint:
    args = dict(base_url=server.base_url, api_key=KEY, model=MODEL_NAME, cache_root=None, prices=PRICES, **FAST)
    args.update(kwargs)
    return OpenAIEndpoint(**args)


def posts(server) -> int:
    return len(server.posts())


# ----------------------------------------------------------------------------- round trips


def test_chat_round_trip_with_usage_and_cost(server):
    llm = endpoint(server)
    r = llm.chat(CHAT, max_tokens=3, temperature=0)
    assert r.body["object"] == "chat.completion"
    assert r.body["choices"][0]["message"]["role"] == "assistant"
    assert isinstance(r.body["choices"][0]["message"]["content"], str)
    assert r.usage.cache_hit is False
    assert r.usage.tokens_in == r.body["usage"]["prompt_tokens"] > 0
    assert r.usage.tokens_out == r.body["usage"]["completion_tokens"]
    assert 1 <= r.usage.tokens_out <= 3
    assert r.usage.cost_usd == pytest.approx((r.usage.tokens_in * 1.0 + r.usage.tokens_out * 2.0) / 1e6)
    assert llm.stats["requests"] == 1 and llm.stats["cache_misses"] == 1
    assert llm.stats["tokens_in"] == r.usage.tokens_in and llm.stats["cost_usd"] == pytest.approx(r.usage.cost_usd)
    body = server.posts("/chat/completions")[0]
    assert body["model"] == MODEL_NAME and body["max_tokens"] == 3 and body["messages"] == CHAT

    # greedy decoding is deterministic; chat logprobs come back per generated token
    r2 = llm.chat(CHAT, max_tokens=3, temperature=0, logprobs=True, top_logprobs=4)
    assert r2.body["choices"][0]["message"]["content"] == r.body["choices"][0]["message"]["content"]
    content = r2.body["choices"][0]["logprobs"]["content"]
    assert len(content) == r2.usage.tokens_out
    for item in content:
        assert len(item["top_logprobs"]) == 4
        assert item["logprob"] == pytest.approx(item["top_logprobs"][0]["logprob"])  # greedy = argmax


def test_completion_echo_returns_prompt_logprobs(server):
    llm = endpoint(server)
    prompt = "the\tunknown\nword\t3\nfor\tunknown"
    r = llm.completion(prompt, echo=True, logprobs=3, max_tokens=0)
    choice = r.body["choices"][0]
    assert choice["text"] == prompt
    lp = choice["logprobs"]
    n = len(lp["tokens"])
    assert n == r.usage.tokens_in and r.usage.tokens_out == 0
    assert "".join(lp["tokens"]).endswith(prompt)
    assert len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(lp["text_offset"]) == n
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    for value, top in zip(lp["token_logprobs"][1:], lp["top_logprobs"][1:]):
        assert value <= 0 and 1 <= len(top) <= 3
        assert value <= max(top.values()) + 1e-6
    assert r.usage.cost_usd == pytest.approx(n / 1e6)

    g = llm.completion("def f(x):", max_tokens=2, temperature=0)
    assert g.usage.tokens_out == 2 and isinstance(g.body["choices"][0]["text"], str)


def test_price_table_file_and_lookup():
    prices = load_prices()
    assert "_comment" not in prices and prices["default"] == 0
    assert price("gpt-4o-mini-2024-07-18", 1_000_000, 0, prices) == prices["gpt-4o-mini"]["input"]
    assert price("gpt-4.1-mini", 0, 1_000_000, prices) == prices["gpt-4.1-mini"]["output"]
    assert price("my-local-llama", 10_000, 10_000, prices) == 0.0
    assert price("x", 1_000_000, 1_000_000, {"default": 3}) == 6.0


# ----------------------------------------------------------------------------- cache


def test_cache_hits_make_no_requests_and_hold_no_key(server, tmp_path):
    llm = endpoint(server, cache_root=str(tmp_path / "cache"))
    first = llm.chat(CHAT, max_tokens=2, temperature=0)
    assert posts(server) == 1 and first.usage.cache_hit is False

    again = llm.chat(CHAT, max_tokens=2, temperature=0)
    assert posts(server) == 1, "a cache hit must not reach the server"
    assert again.usage.cache_hit is True and again.usage.cost_usd == 0.0
    assert again.body["choices"] == first.body["choices"]
    assert again.usage.tokens_in == first.usage.tokens_in
    assert llm.stats["cache_hits"] == 1 and llm.stats["cache_misses"] == 1 and llm.stats["requests"] == 1

    llm.chat(CHAT, max_tokens=2, temperature=0, seed=1)  # different params: a miss
    llm.completion("abc", max_tokens=1, temperature=0)
    assert posts(server) == 3

    # Persistent, and not keyed on the API key: a new object (another key) still hits.
    other = OpenAIEndpoint(server.base_url, "sk-another-key", MODEL_NAME, str(tmp_path / "cache"), prices=PRICES)
    assert other.chat(CHAT, max_tokens=2, temperature=0).usage.cache_hit is True
    assert posts(server) == 3

    files = sorted((tmp_path / "cache").rglob("*.json"))
    assert len(files) == 3
    for f in files:
        assert f.parent.name == f.stem[:2] and len(f.stem) == 64
        text = f.read_text()
        assert KEY not in text and "sk-another-key" not in text
        assert json.loads(text)["response"]["choices"]
    assert not list((tmp_path / "cache").rglob("*.tmp"))

    # A corrupt entry is a miss (and is rewritten), never a crash.
    key = llm.cache_key("chat", {"messages": CHAT, "max_tokens": 2, "temperature": 0})
    (tmp_path / "cache" / key[:2] / f"{key}.json").write_text("{truncated")
    assert llm.chat(CHAT, max_tokens=2, temperature=0).usage.cache_hit is False
    assert llm.chat(CHAT, max_tokens=2, temperature=0).usage.cache_hit is True
    assert posts(server) == 4


def test_failures_are_not_cached(server, tmp_path):
    llm = endpoint(server, cache_root=str(tmp_path), max_retries=0)
    server.script(["500"])
    with pytest.raises(LLMRequestError):
        llm.chat(CHAT, max_tokens=1, temperature=0)
    assert not list(tmp_path.rglob("*.json"))
    assert llm.chat(CHAT, max_tokens=1, temperature=0).usage.cache_hit is False


# ----------------------------------------------------------------------------- retries


def test_retries_429_then_500_then_success(server):
    llm = endpoint(server)
    server.script(["429", "500", "ok"])
    r = llm.chat(CHAT, max_tokens=1, temperature=0)
    assert r.body["choices"][0]["message"]["content"] is not None
    assert llm.stats["retries"] == 2 and llm.stats["requests"] == 3
    assert posts(server) == 3


def test_other_4xx_is_not_retried(model_dir):
    with FakeOpenAIServer(model_dir, api_key=KEY, chat_logprobs=False) as server:
        llm = endpoint(server)
        with pytest.raises(LLMRequestError) as info:
            llm.chat(CHAT, max_tokens=1, logprobs=True, top_logprobs=5)
        assert info.value.status == 400 and info.value.attempts == 1
        assert posts(server) == 1 and llm.stats["retries"] == 0


def test_persistent_500_gives_up_after_max_retries(server):
    llm = endpoint(server, max_retries=3)
    server.script(["500"] * 4)
    with pytest.raises(LLMRequestError) as info:
        llm.chat(CHAT, max_tokens=1)
    error = info.value
    message = str(error)
    assert error.status == 500 and error.attempts == 4
    assert "500" in message and MODEL_NAME in message and f"{server.base_url}/chat/completions" in message
    assert KEY not in message and KEY not in repr(error.args) and KEY not in repr(llm)
    assert posts(server) == 4 and llm.stats["retries"] == 3


def test_timeout_is_retried(server):
    llm = endpoint(server, timeout_s=0.5)
    server.script(["slow:2.0"])
    start = time.monotonic()
    r = llm.chat(CHAT, max_tokens=1, temperature=0)
    assert time.monotonic() - start < 1.9, "the slow answer was not abandoned"
    assert r.usage.tokens_out == 1 and llm.stats["retries"] == 1 and posts(server) == 2


def test_malformed_body_is_retried_then_reported(server):
    llm = endpoint(server, max_retries=1)
    server.script(["malformed"])
    assert llm.completion("x = 1", max_tokens=1, temperature=0).usage.tokens_out == 1
    assert llm.stats["retries"] == 1

    server.script(["malformed", "malformed"])
    with pytest.raises(LLMRequestError, match="malformed"):
        llm.completion("x = 2", max_tokens=1, temperature=0)
    assert posts(server) == 4


def test_connection_refused_raises(model_dir):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    llm = OpenAIEndpoint(f"http://127.0.0.1:{port}/v1", KEY, MODEL_NAME, None, max_retries=1, **FAST)
    with pytest.raises(LLMRequestError, match="connection error") as info:
        llm.chat(CHAT, max_tokens=1)
    assert info.value.attempts == 2 and info.value.status is None


def test_retry_after_header_parsing():
    assert openai_client._retry_after({"retry-after": "0"}) == 0.0
    assert openai_client._retry_after({"retry-after-ms": "250", "retry-after": "9"}) == 0.25
    assert openai_client._retry_after({}) is None
    assert 0 <= openai_client._retry_after({"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}) < 1  # in the past


# ----------------------------------------------------------------------------- limits


def test_requests_per_minute_paces_requests(server):
    llm = endpoint(server, requests_per_minute=120)  # 2/s, bursts of at most 2
    start = time.monotonic()
    for i in range(5):
        llm.completion(f"n = {i}", max_tokens=1, temperature=0)
    elapsed = time.monotonic() - start
    assert 1.4 <= elapsed < 6.0, elapsed


def test_token_bucket_paces_by_cost():
    bucket = openai_client._Bucket(600, now=0.0)  # 10 tokens/s, holds 10
    assert bucket.reserve(4, now=0.0) == 0.0
    assert bucket.reserve(26, now=0.0) == pytest.approx(2.0)  # overdrawn by 20 -> 2 s
    assert bucket.reserve(1, now=2.0) == pytest.approx(0.1)
    bucket.refund(5, now=2.0)  # the server used fewer tokens than estimated
    assert bucket.reserve(1, now=2.0) == 0.0


def _hammer(calls) -> None:
    threads = [threading.Thread(target=c) for c in calls]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)


def test_max_concurrency_is_shared_per_base_url(server):
    a = endpoint(server, max_concurrency=1)
    b = endpoint(server)  # same base_url: shares a's limit (the most restrictive wins)
    server.script(["slow:0.2"] * 4)
    _hammer([lambda i=i, llm=llm: llm.completion(f"a{i}", max_tokens=1) for i in range(2) for llm in (a, b)])
    assert posts(server) == 4 and server.max_in_flight == 1

    # Control: the same load with room for 4 does overlap, so the check above can fail.
    openai_client.reset_shared_limits()
    c = endpoint(server, max_concurrency=4)
    server.max_in_flight = 0
    server.script(["slow:0.3"] * 4)
    _hammer([lambda i=i: c.completion(f"c{i}", max_tokens=1) for i in range(4)])
    assert server.max_in_flight >= 2


# ----------------------------------------------------------------------------- probe


def test_probe_full_server_is_all_at_once(server, tmp_path):
    llm = endpoint(server, cache_root=str(tmp_path))
    assert llm.probe() == "all_at_once"
    n = posts(server)
    assert llm.probe() == "all_at_once" and posts(server) == n  # cached


def test_probe_without_completions_is_chat_logprobs(model_dir):
    with FakeOpenAIServer(model_dir, api_key=KEY, completions=False) as server:
        assert endpoint(server).probe() == "chat_logprobs"
        assert len(server.posts("/completions")) == 2  # one of them on /chat/completions


def test_probe_without_any_logprobs_is_json(model_dir):
    with FakeOpenAIServer(model_dir, api_key=KEY, completions=False, chat_logprobs=False) as server:
        assert endpoint(server).probe() == "json"


def test_probe_wrong_key_raises_401(server):
    llm = endpoint(server, api_key="sk-wrong")
    with pytest.raises(LLMRequestError, match="401") as info:
        llm.probe()
    assert info.value.status == 401 and posts(server) == 1 and "sk-wrong" not in str(info.value)


def test_cache_on_an_object_store_path(server):
    # fsspec's in-memory filesystem takes the same single-write path as s3:// (no rename).
    root = f"memory://llm-cache-{time.time_ns()}"
    llm = endpoint(server, cache_root=root)
    assert llm.chat(CHAT, max_tokens=1, temperature=0).usage.cache_hit is False
    assert endpoint(server, cache_root=root).chat(CHAT, max_tokens=1, temperature=0).usage.cache_hit is True
    assert posts(server) == 1
    from upath import UPath

    files = [p for p in UPath(root).rglob("*.json")]
    assert len(files) == 1 and KEY not in files[0].read_text()


def test_identical_concurrent_requests_reach_the_server_once(server, tmp_path):
    llm = endpoint(server, cache_root=str(tmp_path))
    server.script(["slow:0.3"])
    results = []
    _hammer([lambda: results.append(llm.chat(CHAT, max_tokens=1, temperature=0)) for _ in range(4)])
    assert posts(server) == 1
    assert sorted(r.usage.cache_hit for r in results) == [False, True, True, True]
