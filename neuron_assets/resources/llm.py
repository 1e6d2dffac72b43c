"""The explainer and simulator LLMs: 'local' (transformers in this process) or 'openai' (the
openai SDK against OpenAI, vLLM, Ollama, llama.cpp or any OpenAI-compatible endpoint)."""

import functools
from dataclasses import replace
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from dagster import ConfigurableResource

from neuron_assets.method.prompts import simulator_prefix, simulator_segments
from neuron_assets.method.remote import (
    METHODS,
    all_at_once_prompt,
    chat_simulation_messages,
    json_simulation_messages,
    read_all_at_once,
    read_chat_logprobs,
    read_json_simulation,
)
from neuron_assets.method.simulation import expected_values
from neuron_assets.resources.local_llm import LocalSimulator, generate_texts
from neuron_assets.resources.models import describe_model, load_causal_lm
from neuron_assets.resources.openai_client import LLMRequestError, OpenAIEndpoint, load_prices
from neuron_assets.stages.results import Answer, Simulation, Usage
from neuron_assets.versions import llm_version

BACKENDS = ("local", "openai")
PRICES = Path(__file__).resolve().parents[2] / "resources" / "prices.json"
TOP_LOGPROBS = 15  # what the reference requests; OpenAI allows up to 20


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
def _local_simulator(model: str, cache: str, device: str, prefix: str, batch_size: int) -> LocalSimulator:
    # The few-shot prefix's key/value cache is computed once per process and reused for every
    # neuron and sequence.
    lm, tokenizer = load_causal_lm(model, cache, device)
    return LocalSimulator(lm, tokenizer, prefix, batch_size=batch_size)


class LocalSimulation:
    """All at once, from the logits of a model in this process (docs/method.md, Simulation)."""

    method = "all_at_once"

    def __init__(self, engine: LocalSimulator):
        self.engine = engine

    def simulate(self, explanation: str, sequences: list[list[str]]) -> list[Simulation]:
        distributions = self.engine.simulate([simulator_segments(explanation, tokens) for tokens in sequences])
        return [_simulation(p, np.zeros(len(p), dtype=bool)) for p in distributions]


class RemoteSimulation:
    """One request per sequence through an OpenAI-compatible endpoint, by the given method."""

    def __init__(self, endpoint: OpenAIEndpoint, method: str, fewshot: list[dict], max_concurrency: int):
        self.endpoint, self.method, self.fewshot = endpoint, method, fewshot
        self.prefix = simulator_prefix(fewshot)
        self.max_concurrency = max_concurrency

    def simulate(self, explanation: str, sequences: list[list[str]]) -> list[Simulation]:
        with ThreadPoolExecutor(max_workers=max(1, self.max_concurrency)) as pool:
            return list(pool.map(lambda tokens: self._one(explanation, tokens), sequences))

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
    offline). backend 'openai': the openai SDK against `base_url` (OpenAI when unset), with a
    persistent response cache, rate limits, timeouts and retries."""

    backend: str = "local"
    model: str = "embedded"
    base_url: str | None = None
    api_key: str | None = None
    simulation_method: str = "auto"
    temperature: float = 1.0
    max_tokens: int = 60
    batch_size: int = 8
    device: str = "auto"
    cache: str = "~/.cache/neuron_assets"
    response_cache: str | None = None
    requests_per_minute: int = 0
    tokens_per_minute: int = 0
    max_concurrency: int = 4
    timeout_s: float = 60.0
    max_retries: int = 5
    prices: str = str(PRICES)

    @property
    def label(self) -> str:
        if self.backend == "local":
            return describe_model(self.model)
        return f"{self.model} @ {self.base_url or 'api.openai.com'}"

    def version(self, role: str) -> str:
        """The version of this LLM as the `explainer` or `simulator` settings source computes it:
        rows made by the same version (and inputs) are reused instead of asked again."""
        method = self.simulation_method if role == "simulator" else None
        return llm_version(self.backend, self.model, self.base_url, method, role)

    @property
    def continues_assistant_turn(self) -> bool:
        """A local model can be handed the start of its answer (a prefill); chat APIs cannot."""
        return self.backend == "local"

    def endpoint(self) -> OpenAIEndpoint:
        if self.backend not in BACKENDS:
            raise ValueError(f"LLM backend {self.backend!r} is not supported; use one of {', '.join(BACKENDS)}")
        return _endpoint(self.base_url, self.api_key, self.model, self.response_cache, self.requests_per_minute,
                         self.tokens_per_minute, self.max_concurrency, self.timeout_s, self.max_retries, self.prices)

    def complete(self, conversations: list[list[dict]], seeds: list[int], temperature: float | None = None,
                 max_tokens: int | None = None) -> list[Answer]:
        """One answer per chat conversation.
        `temperature` and `max_tokens` default to the resource's (a judge answers at temperature 0).

        Remote requests carry their conversation's seed, so a request (and its cache key) does not
        depend on which other neurons share the batch; a local batch samples from its first seed.
        """
        temperature = self.temperature if temperature is None else temperature
        max_tokens = max_tokens or self.max_tokens
        if self.backend == "local":
            lm, tokenizer = load_causal_lm(self.model, self.cache, self.device)
            answers = generate_texts(lm, tokenizer, conversations, max_new_tokens=max_tokens,
                                     temperature=temperature, seed=seeds[0], batch_size=self.batch_size)
            return answers
        endpoint = self.endpoint()

        def one(messages, seed):
            try:
                reply = endpoint.chat(messages, temperature=temperature, top_p=1, max_tokens=max_tokens, seed=seed)
                return Answer(reply.body["choices"][0]["message"]["content"] or "", reply.usage)
            except LLMRequestError as e:
                return Answer.failed(f"request failed: {e}")

        with ThreadPoolExecutor(max_workers=max(1, self.max_concurrency)) as pool:
            return list(pool.map(one, conversations, seeds))

    def simulation(self, fewshot: list[dict], log=None) -> LocalSimulation | RemoteSimulation:
        """The simulator for this backend; 'auto' probes the endpoint for the best method."""
        if self.backend == "local":
            if self.simulation_method not in ("auto", "all_at_once"):
                raise ValueError(f"the local backend simulates all_at_once, not {self.simulation_method!r}")
            prefix = simulator_prefix(fewshot)
            return LocalSimulation(_local_simulator(self.model, self.cache, self.device, prefix, self.batch_size))
        endpoint = self.endpoint()
        method = self.simulation_method
        if method == "auto":
            method = endpoint.probe()
            if log:
                log(f"simulation method for {self.label}: {method} (probed; best of {', '.join(METHODS)})")
        elif method not in METHODS:
            raise ValueError(f"simulation method {method!r} is not one of auto, {', '.join(METHODS)}")
        return RemoteSimulation(endpoint, method, fewshot, self.max_concurrency)


@functools.lru_cache(maxsize=16)
def _endpoint(base_url, api_key, model, response_cache, rpm, tpm, concurrency, timeout_s, retries, prices) -> OpenAIEndpoint:
    # One endpoint object per configuration and process: its cache counters and limits are shared.
    return OpenAIEndpoint(base_url=base_url, api_key=api_key, model=model, cache_root=response_cache,
                          requests_per_minute=rpm, tokens_per_minute=tpm, max_concurrency=concurrency,
                          timeout_s=timeout_s, max_retries=retries, prices=load_prices(prices))
