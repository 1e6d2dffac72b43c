"""The explainer and simulator LLMs: 'local' (transformers in this process) or 'openai' (the
openai SDK against OpenAI, vLLM, Ollama, llama.cpp or any OpenAI-compatible endpoint)."""

import base64
import functools
import hashlib
import threading
from dataclasses import replace
from pathlib import Path

import numpy as np
from dagster import ConfigurableResource, InitResourceContext
from pydantic import PrivateAttr

from neuron_assets.method.prompts import simulator_prefix, simulator_segments, simulator_target_header
from neuron_assets.method.remote import (
    METHODS,
    all_at_once_prompt,
    chat_simulation_messages,
    json_simulation_messages,
    read_all_at_once,
    read_chat_logprobs,
    read_json_simulation,
)
from neuron_assets.method.detection import answer_probabilities, read_answer
from neuron_assets.method.simulation import expected_values
from neuron_assets.resources.local_judge import JUDGE_METHOD, judge_conversations
from neuron_assets.resources.local_llm import LocalSimulator, generate_texts
from neuron_assets.resources.models import describe_model, load_causal_lm, pick_device, torch_dtype
from neuron_assets.resources.openai_client import UNSUPPORTED_STATUSES, LLMRequestError, OpenAIEndpoint, load_prices
from neuron_assets.resources.response_cache import ResponseCache
from neuron_assets.stages.concurrent import in_order
from neuron_assets.stages.results import Answer, Simulation, Usage, Verdict
from neuron_assets.versions import llm_version, model_identity

BACKENDS = ("local", "openai")
LLM_POOL = "llm"  # the Dagster pool of the steps that call an LLM: at most its limit run at once
# Rounds of an endpoint's concurrency that a stage hands to one call: a call waits for its slowest
# request, so its last round fills part of the slots only; over 16 rounds that is a small share.
ROUNDS_PER_CALL = 16
PRICES = Path(__file__).resolve().parents[2] / "resources" / "prices.json"
TOP_LOGPROBS = 15  # what the reference requests; OpenAI allows up to 20
JUDGE_TOP_LOGPROBS = 5  # "0" and "1" are all a judge's value needs
# (base_url, model) -> whether the endpoint gives chat logprobs (it rejected them: the judge asks
# for text only); until that is known, the judge's requests to it go one at a time.
_CHAT_LOGPROBS: dict[tuple[str, str], bool] = {}
_LEARNING: dict[tuple[str, str], threading.Lock] = {}
_LEARNING_LOCK = threading.Lock()
# Named in the (unlikely) error of a local model file that vanished while it was being identified.
LOCAL_MODEL_SETTINGS = "NEURON_ASSETS_EXPLAINER_MODEL or NEURON_ASSETS_SIMULATOR_MODEL"


def _simulation(probs_or_values: np.ndarray, failed: np.ndarray, point: bool = False,
                usage: Usage = Usage()) -> Simulation:
    if point:
        expected = np.where(failed, np.nan, probs_or_values).astype(np.float32)
    else:
        expected, no_mass = expected_values(probs_or_values)
        failed = failed | no_mass
        expected = np.where(failed, np.nan, expected).astype(np.float32)
    n_failed = int(failed.sum())
    error = f"the simulator gave no usable value at {n_failed} of {len(failed)} tokens" if n_failed else None
    return Simulation(expected, n_failed, error, usage)


@functools.lru_cache(maxsize=4)
def _local_simulator(model: str, cache: str, device: str, dtype: str, prefix: str, batch_size: int) -> LocalSimulator:
    # The few-shot prefix's key/value cache is computed once per process and reused for every
    # neuron and sequence.
    lm, tokenizer = load_causal_lm(model, cache, device, dtype=dtype)
    return LocalSimulator(lm, tokenizer, prefix, batch_size=batch_size)


class LocalSimulation:
    """All at once, from the logits of a model in this process (docs/method.md, Simulation).

    Each sequence's value distribution is kept in the response cache under what decides it (the
    model, device, prompt prefix and the sequence's own prompt), written when a call's sequences
    are done: a rerun computes only the sequences it does not find there.
    """

    method = "all_at_once"

    def __init__(self, engine: LocalSimulator, cache: ResponseCache, request: dict):
        self.engine, self.cache, self.request = engine, cache, request

    def simulate(self, explanation: str, sequences: list[list[str]]) -> list[Simulation]:
        return self.simulate_many([(explanation, sequences)])[0]

    def simulate_many(self, jobs: list[tuple[str, list[list[str]]]]) -> list[list[Simulation]]:
        """Per (explanation, sequences) job, its simulations. The sequences missing from the cache go
        to the model explanation by explanation: the text they share after the few-shot prefix (the
        explanation's header) is computed once for all of them."""
        requests = [[{**self.request, "segments": simulator_segments(explanation, tokens)} for tokens in sequences]
                    for explanation, sequences in jobs]
        keys = [[self.cache.key(request) for request in job] for job in requests]
        found = {key: self.cache.get(key) for job in keys for key in job}
        # Each missing prompt once (a window can be among a neuron's top and its random records, and
        # two variants can share a text); a repeat is answered like a cache hit, as a remote repeat is.
        todo = {key: request for job_keys, job in zip(keys, requests) for key, request in zip(job_keys, job)
                if found[key] is None}
        for (explanation, _), job_keys in zip(jobs, keys):
            mine = {key: todo[key] for key in dict.fromkeys(job_keys) if found[key] is None}
            if not mine:
                continue
            header = simulator_target_header(explanation)
            rest = [[r["segments"][0][len(header):], *r["segments"][1:]] for r in mine.values()]
            for (key, request), probs in zip(mine.items(), self.engine.simulate(rest, shared=header)):
                found[key] = _encode_array(probs)
                self.cache.put(key, found[key], **request)
        out = []
        for job_keys in keys:
            results = []
            for key in job_keys:
                probs = _decode_array(found[key])
                results.append(_simulation(probs, np.zeros(len(probs), dtype=bool),
                                           usage=Usage(cache_hit=key not in todo)))
                todo.pop(key, None)  # computed for its first occurrence only
            out.append(results)
        return out


def _encode_array(values: np.ndarray) -> dict:
    """An array as JSON, bit for bit (float64 little-endian bytes in base64)."""
    data = np.ascontiguousarray(values, dtype="<f8")
    return {"shape": list(data.shape), "float64": base64.b64encode(data.tobytes()).decode("ascii")}


def _decode_array(entry: dict) -> np.ndarray:
    return np.frombuffer(base64.b64decode(entry["float64"]), dtype="<f8").reshape(entry["shape"])


class RemoteSimulation:
    """One request per sequence through an OpenAI-compatible endpoint, by the given method."""

    def __init__(self, endpoint: OpenAIEndpoint, method: str, fewshot: list[dict], concurrency: int):
        self.endpoint, self.method, self.fewshot = endpoint, method, fewshot
        self.prefix = simulator_prefix(fewshot)
        self.concurrency = concurrency

    def simulate(self, explanation: str, sequences: list[list[str]]) -> list[Simulation]:
        return self.simulate_many([(explanation, sequences)])[0]

    def simulate_many(self, jobs: list[tuple[str, list[list[str]]]]) -> list[list[Simulation]]:
        """Per (explanation, sequences) job, its simulations; the requests of all jobs go out
        `concurrency` at once, so the endpoint stays busy across explanations."""
        flat = [(explanation, tokens) for explanation, sequences in jobs for tokens in sequences]
        results = in_order(lambda job: self._one(*job), flat, self.concurrency)
        ends = np.cumsum([len(sequences) for _, sequences in jobs])
        return [results[end - len(sequences):end] for end, (_, sequences) in zip(ends, jobs)]

    def _one(self, explanation: str, tokens: list[str]) -> Simulation:
        try:
            if self.method == "all_at_once":
                prompt, reads = all_at_once_prompt(self.prefix, explanation, tokens)
                reply = self.endpoint.completion(prompt, echo=True, logprobs=TOP_LOGPROBS, max_tokens=0)
                lp = reply.body["choices"][0]["logprobs"]
                # Offsets are rebuilt from the echoed tokens: servers disagree on whether their
                # text_offset counts an added start-of-text token.
                probs, failed = read_all_at_once(lp["tokens"], None, lp["top_logprobs"], prompt, reads)
                return _simulation(probs, failed, usage=reply.usage)
            if self.method == "chat_logprobs":
                messages = chat_simulation_messages(explanation, tokens, self.fewshot)
                reply = self.endpoint.chat(messages, temperature=0, logprobs=True, top_logprobs=TOP_LOGPROBS,
                                           max_tokens=8 * len(tokens) + 16)
                content = reply.body["choices"][0]["logprobs"]["content"] or []
                pairs = [(c["token"], {t["token"]: t["logprob"] for t in c["top_logprobs"]}) for c in content]
                probs, failed = read_chat_logprobs(pairs, tokens)
                return _simulation(probs, failed, usage=reply.usage)
            messages = json_simulation_messages(explanation, tokens, self.fewshot)
            reply = self.endpoint.chat(messages, temperature=0, max_tokens=16 * len(tokens) + 32)
            values, failed, error = read_json_simulation(reply.body["choices"][0]["message"]["content"] or "", tokens)
            result = _simulation(values, failed, point=True, usage=reply.usage)
            return replace(result, error=error or result.error)
        except (LLMRequestError, KeyError, TypeError, ValueError) as e:
            return Simulation.failed(f"simulator request failed: {type(e).__name__}: {e}", len(tokens))


class LLM(ConfigurableResource):
    """An explainer or simulator. backend 'local': a Hugging Face causal LM in this process (free,
    offline). backend 'openai': the openai SDK against `base_url` (OpenAI when unset), with rate
    limits, timeouts and retries. Both keep every answer in the persistent response cache at
    `response_cache` (none when unset), so a rerun, after an interrupt too, asks again only what
    it does not find there."""

    backend: str = "local"
    model: str = "embedded"
    base_url: str | None = None
    api_key: str | None = None
    simulation_method: str = "auto"
    temperature: float = 1.0
    max_tokens: int = 60
    batch_size: int = 8
    device: str = "auto"
    dtype: str = "auto"  # a local model's number format (settings.LLM_DTYPES)
    cache: str = "~/.cache/neuron_assets"
    response_cache: str | None = None
    requests_per_minute: int = 0
    tokens_per_minute: int = 0
    max_concurrency: int = 4
    timeout_s: float = 60.0
    max_retries: int = 5
    prices: str = str(PRICES)
    model_setting: str = LOCAL_MODEL_SETTINGS  # the setting that names `model`, for the errors that say to change it
    # how many steps may call this endpoint at once, each in its own process with its own limiter
    _sharing: int = PrivateAttr(default=1)

    def setup_for_execution(self, context: InitResourceContext) -> None:
        if context.instance is not None and self.backend == "openai":
            self._sharing = steps_at_once(context.instance)
            if self._sharing > 1 and context.log is not None:
                context.log.info(f"{self._sharing} LLM steps may run at once (pool '{LLM_POOL}'): this one takes "
                                 f"1/{self._sharing} of the endpoint's limits {self.limits()}")

    def limits(self) -> dict[str, int]:
        """This step's share of the endpoint's limits (0: none): requests and tokens per minute, requests in flight."""
        return {name: share(limit, self._sharing) for name, limit in (
            ("requests_per_minute", self.requests_per_minute), ("tokens_per_minute", self.tokens_per_minute),
            ("max_concurrency", self.max_concurrency))}

    @property
    def concurrency(self) -> int:
        """Requests this step keeps in flight: its share of max_concurrency; 1 for the local backend,
        whose one model batches instead."""
        return 1 if self.backend == "local" else max(1, self.limits()["max_concurrency"])

    @property
    def requests_per_call(self) -> int:
        """How many requests a stage hands to one call: a batch of the local model; ROUNDS_PER_CALL
        rounds of an endpoint's concurrency (a remote request carries its own seed, so how requests
        are grouped into calls changes no answer)."""
        return self.batch_size if self.backend == "local" else max(self.batch_size, ROUNDS_PER_CALL * self.concurrency)

    @property
    def label(self) -> str:
        if self.backend == "local":
            return describe_model(self.model) + (f" in {self.dtype}" if self.dtype != "auto" else "")
        return f"{self.model} @ {self.base_url or 'api.openai.com'}"

    def version(self, role: str) -> str:
        """The version of this LLM as the `explainer` or `simulator` settings source computes it:
        rows made by the same version (and inputs) are reused instead of asked again."""
        method = self.simulation_method if role == "simulator" else None
        return llm_version(self.backend, self.model, self.base_url, method, role, self.dtype)

    @property
    def continues_assistant_turn(self) -> bool:
        """A local model can be handed the start of its answer (a prefill); chat APIs cannot."""
        return self.backend == "local"

    def endpoint(self) -> OpenAIEndpoint:
        if self.backend not in BACKENDS:
            raise ValueError(f"LLM backend {self.backend!r} is not supported; use one of {', '.join(BACKENDS)}")
        limits = self.limits()
        return _endpoint(self.base_url, self.api_key, self.model, self.response_cache, limits["requests_per_minute"],
                         limits["tokens_per_minute"], limits["max_concurrency"], self.timeout_s, self.max_retries,
                         self.prices, self.model_setting)

    def complete(self, conversations: list[list[dict]], seeds: list[int], temperature: float | None = None,
                 max_tokens: int | None = None) -> list[Answer]:
        """One answer per chat conversation.
        `temperature` and `max_tokens` default to the resource's.

        Remote requests carry their conversation's seed, so a request (and its cache key) does not
        depend on which other neurons share the batch; a local batch samples from its first seed.
        """
        temperature = self.temperature if temperature is None else temperature
        max_tokens = max_tokens or self.max_tokens
        if self.backend == "local":
            return self._complete_locally(conversations, seeds[0], temperature, max_tokens)
        endpoint = self.endpoint()

        def one(messages, seed):
            try:
                reply = endpoint.chat(messages, temperature=temperature, top_p=1, max_tokens=max_tokens, seed=seed)
                return Answer(reply.body["choices"][0]["message"]["content"] or "", reply.usage)
            except LLMRequestError as e:
                return Answer.failed(f"request failed: {e}")

        return in_order(lambda job: one(*job), zip(conversations, seeds), self.concurrency)

    def _local_request(self, **request) -> dict:
        """What decides a local model's answer to `request`: the model's files, the device type and
        the number format where it is not the device's own (bfloat16 on a GPU, float32 on a CPU)."""
        device = pick_device(self.device)
        pinned = torch_dtype(self.dtype, device) != torch_dtype("auto", device)
        return {"backend": "local", "model": model_identity(self.model, LOCAL_MODEL_SETTINGS),
                "device": device.type, **({"dtype": self.dtype} if pinned else {}), **request}

    def _complete_locally(self, conversations: list[list[dict]], seed: int, temperature: float,
                          max_tokens: int) -> list[Answer]:
        """`generate_texts`, through the response cache. Every row of a local batch samples from one
        seed, so an answer depends on the whole batch: the batch is what is cached, one entry
        written as soon as it is generated."""
        cache = ResponseCache(self.response_cache)
        request = self._local_request(task="generate", conversations=conversations, seed=seed, temperature=temperature,
                                      top_p=1.0, max_tokens=max_tokens, batch_size=self.batch_size)
        key = cache.key(request)
        stored = cache.get(key)
        if stored is not None:
            return [Answer(a["text"], Usage(a["tokens_in"], a["tokens_out"], cache_hit=True)) for a in stored["answers"]]
        lm, tokenizer = load_causal_lm(self.model, self.cache, self.device, dtype=self.dtype)
        answers = generate_texts(lm, tokenizer, conversations, max_new_tokens=max_tokens, temperature=temperature,
                                 seed=seed, batch_size=self.batch_size)
        cache.put(key, {"answers": [{"text": a.text, "tokens_in": a.usage.tokens_in, "tokens_out": a.usage.tokens_out}
                                    for a in answers]}, **request)
        return answers

    @property
    def judge_method(self) -> str:
        """How `judge` decides: "logits" (local: from the logits of "0" and "1") or "text" (the
        JSON list the remote model writes)."""
        return "logits" if self.backend == "local" else "text"

    def judge(self, conversations: list[list[dict]], sizes: list[int], seed: int) -> list[Verdict]:
        """One Verdict per judge conversation (method/detection.py, `batch_messages`) on sizes[i]
        excerpts, at temperature 0.

        local: every excerpt decided from the logits (resources/local_judge.py), each conversation's
        verdict kept in the response cache. openai: the JSON list the model writes (`read_answer`;
        an answer that cannot be read leaves its excerpts undecided), with p("1") from the answer's
        logprobs where the endpoint gives them; requests carry `seed`.
        """
        if self.backend == "local":
            return self._judge_locally(conversations, sizes)
        endpoint = self.endpoint()

        def one(messages, n):
            try:
                reply = _judge_request(endpoint, messages, seed, max_tokens=4 * n + 8)  # "[1, 0, ...]" and slack
            except LLMRequestError as e:
                return Verdict.failed(f"request failed: {e}", n)
            choice = reply.body["choices"][0]
            text = choice["message"]["content"] or ""
            decisions, unreadable = read_answer(text, n)
            try:
                content = (choice.get("logprobs") or {}).get("content") or []
                tokens = [(c["token"], {t["token"]: t["logprob"] for t in [c, *(c.get("top_logprobs") or [])]})
                          for c in content]
            except (AttributeError, KeyError, TypeError):  # logprobs in another shape: decisions only
                tokens = []
            p_one = answer_probabilities(text, tokens, n) if decisions and tokens else [None] * n
            return Verdict(decisions or [None] * n, p_one, reply.usage, unreadable)

        return in_order(lambda job: one(*job), zip(conversations, sizes), self.concurrency)

    def _judge_locally(self, conversations: list[list[dict]], sizes: list[int]) -> list[Verdict]:
        """`judge_conversations` through the response cache, one entry per conversation: a rerun
        reads what it finds there and asks the model for the rest only."""
        cache = ResponseCache(self.response_cache)
        requests = [self._local_request(task="judge", method=JUDGE_METHOD, conversation=c, size=n)
                    for c, n in zip(conversations, sizes)]
        keys = [cache.key(request) for request in requests]
        found = {key: cache.get(key) for key in keys}
        todo = [i for i, key in enumerate(keys) if found[key] is None]
        if todo:
            lm, tokenizer = load_causal_lm(self.model, self.cache, self.device, dtype=self.dtype)
            judged = judge_conversations(lm, tokenizer, [conversations[i] for i in todo], [sizes[i] for i in todo],
                                         batch_size=self.batch_size)
            for i, judgement in zip(todo, judged):
                found[keys[i]] = {"decisions": judgement.decisions, "p_one": judgement.p_one,
                                  "tokens_in": judgement.prompt_tokens}
                cache.put(keys[i], found[keys[i]], **requests[i])
        return [Verdict(found[key]["decisions"], found[key]["p_one"],
                        Usage(found[key]["tokens_in"], len(found[key]["decisions"]), cache_hit=i not in todo))
                for i, key in enumerate(keys)]

    def simulation(self, fewshot: list[dict], log=None) -> LocalSimulation | RemoteSimulation:
        """The simulator for this backend; 'auto' probes the endpoint for the best method."""
        if self.backend == "local":
            if self.simulation_method not in ("auto", "all_at_once"):
                raise ValueError(f"the local backend simulates all_at_once, not {self.simulation_method!r}")
            prefix = simulator_prefix(fewshot)
            engine = _local_simulator(self.model, self.cache, self.device, self.dtype, prefix, self.batch_size)
            # Entries name the prefix by its hash: it is the same few thousand characters in all of them.
            request = self._local_request(task="simulate", prefix_sha256=hashlib.sha256(prefix.encode()).hexdigest())
            return LocalSimulation(engine, ResponseCache(self.response_cache), request)
        endpoint = self.endpoint()
        method = self.simulation_method
        if method == "auto":
            method = endpoint.probe()
            if log:
                log(f"simulation method for {self.label}: {method} (probed; best of {', '.join(METHODS)})")
        elif method not in METHODS:
            raise ValueError(f"simulation method {method!r} is not one of auto, {', '.join(METHODS)}")
        return RemoteSimulation(endpoint, method, fewshot, self.concurrency)


def _judge_request(endpoint: OpenAIEndpoint, messages: list[dict], seed: int, max_tokens: int):
    """A judge's chat request at temperature 0, with the logprobs of its answer unless the endpoint
    rejected them before: then, and from then on in this process, without. The first request to an
    endpoint finds out alone, so that concurrent judges do not each get rejected."""
    params = {"temperature": 0.0, "top_p": 1, "max_tokens": max_tokens, "seed": seed}
    name = (endpoint.base_url, endpoint.model)
    if name not in _CHAT_LOGPROBS:
        with _LEARNING_LOCK:
            learning = _LEARNING.setdefault(name, threading.Lock())
        with learning:
            if name not in _CHAT_LOGPROBS:
                try:
                    reply = endpoint.chat(messages, logprobs=True, top_logprobs=JUDGE_TOP_LOGPROBS, **params)
                    _CHAT_LOGPROBS[name] = True
                    return reply
                except LLMRequestError as e:
                    if e.status not in UNSUPPORTED_STATUSES:
                        raise
                    _CHAT_LOGPROBS[name] = False
    if _CHAT_LOGPROBS[name]:
        return endpoint.chat(messages, logprobs=True, top_logprobs=JUDGE_TOP_LOGPROBS, **params)
    return endpoint.chat(messages, **params)


def steps_at_once(instance, pool: str = LLM_POOL) -> int:
    """How many steps of `pool` may run at once on `instance`: its slots, else the instance's default
    pool limit; 1 where the pool has no limit (nothing then bounds the steps: each keeps every limit)."""
    slots = instance.event_log_storage.get_concurrency_info(pool).slot_count
    return max(1, slots or instance.event_log_storage.get_pool_config().default_pool_limit or 1)


def share(limit: int, n: int) -> int:
    """One of `n` equal shares of a limit, at least 1; 0 (no limit) stays 0."""
    return max(1, limit // n) if limit else 0


@functools.lru_cache(maxsize=16)
def _endpoint(base_url, api_key, model, response_cache, rpm, tpm, concurrency, timeout_s, retries, prices,
              model_setting) -> OpenAIEndpoint:
    # One endpoint object per configuration and process: its cache counters and limits are shared.
    return OpenAIEndpoint(base_url=base_url, api_key=api_key, model=model, cache_root=response_cache,
                          requests_per_minute=rpm, tokens_per_minute=tpm, max_concurrency=concurrency,
                          timeout_s=timeout_s, max_retries=retries, prices=load_prices(prices),
                          model_setting=model_setting)
