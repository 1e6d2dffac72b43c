"""The explainer and simulator LLMs. Backend 'local': a causal LM in this process."""

import functools

from dagster import ConfigurableResource

from neuron_assets.resources.local_llm import LocalSimulator, generate_texts
from neuron_assets.resources.models import describe_model, load_causal_lm


@functools.lru_cache(maxsize=4)
def _simulator(model: str, cache: str, device: str, prefix: str, batch_size: int) -> LocalSimulator:
    # The few-shot prefix's key/value cache is computed once per process and reused for every
    # neuron and sequence.
    lm, tokenizer = load_causal_lm(model, cache, device)
    return LocalSimulator(lm, tokenizer, prefix, batch_size=batch_size)


class LocalLLM(ConfigurableResource):
    """An in-process Hugging Face causal LM used as explainer or simulator (free, offline)."""

    model: str = "embedded"
    cache: str = "~/.cache/neuron_assets"
    device: str = "auto"
    temperature: float = 1.0
    max_tokens: int = 60
    batch_size: int = 8

    @property
    def label(self) -> str:
        return describe_model(self.model)

    @property
    def continues_assistant_turn(self) -> bool:
        """A local model can be handed the start of its answer (a prefill)."""
        return True

    def complete(self, conversations: list[list[dict]], seed: int) -> list[dict]:
        """One answer per chat conversation: {text, tokens_in, tokens_out}."""
        lm, tokenizer = load_causal_lm(self.model, self.cache, self.device)
        return generate_texts(
            lm, tokenizer, conversations, max_new_tokens=self.max_tokens,
            temperature=self.temperature, seed=seed, batch_size=self.batch_size,
        )

    def simulator(self, prefix: str) -> LocalSimulator:
        return _simulator(self.model, self.cache, self.device, prefix, self.batch_size)
