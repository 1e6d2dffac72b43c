"""The subject model: the language model whose MLP neurons are explained."""

from collections.abc import Iterator

import numpy as np
import torch
from dagster import ConfigurableResource

from neuron_assets.resources.models import (
    ModelShape,
    describe_model,
    layer_weight_hashes,
    load_causal_lm,
    model_shape,
    neuron_module,
    output_logits,
)


class _StopForward(Exception):
    """Raised by the deepest requested layer's hook: nothing after it is ever computed."""


class SubjectModel(ConfigurableResource):
    """A Hugging Face causal LM, read at the input of each MLP output projection."""

    model: str = "embedded"
    cache: str = "~/.cache/neuron_assets"
    device: str = "auto"
    batch_size: int = 16

    @property
    def label(self) -> str:
        return describe_model(self.model)

    def shape(self) -> ModelShape:
        return model_shape(self.model, self.cache)

    def load(self):
        return load_causal_lm(self.model, self.cache, self.device)

    def tokenizer(self):
        return self.load()[1]

    def layer_hashes(self, layers: list[int]) -> dict[int, str]:
        """{layer: hash of that layer's weights}, read from the checkpoint on disk (not the cached model)."""
        return layer_weight_hashes(self.model, self.cache, layers, self.device)

    def promoted_tokens(self, layer: int, k: int, chunk: int = 512) -> tuple[np.ndarray, np.ndarray]:
        """(token ids, logits), int64 and float32 [neurons, k], best first: per neuron of `layer`, the
        k tokens its output direction promotes most (resources/models.py `output_logits`)."""
        model, _ = self.load()
        n = self.shape().n_neurons
        ids, logits = [], []
        with torch.inference_mode():
            for start in range(0, n, chunk):  # bounded memory: chunk x vocabulary logits at a time
                top = torch.topk(output_logits(model, layer, slice(start, min(start + chunk, n))), k, dim=-1)
                ids.append(top.indices.cpu().numpy())
                logits.append(top.values.cpu().numpy())
        return np.concatenate(ids), np.concatenate(logits)

    def neuron_activations(self, windows: np.ndarray, layers: list[int]) -> Iterator[tuple[int, dict[int, np.ndarray]]]:
        """Yield (first window index, {layer: float32 [B, T, N]}) per batch of token windows.

        One forward pass per batch serves every requested layer; it stops inside the deepest
        requested layer, so deeper layers and the LM head are never computed.
        """
        model, _ = self.load()
        captured: dict[int, torch.Tensor] = {}
        deepest = max(layers)

        def hook_for(layer):
            def hook(module, args):
                captured[layer] = args[0].detach()
                if layer == deepest:
                    raise _StopForward

            return hook

        handles = [neuron_module(model, layer).register_forward_pre_hook(hook_for(layer)) for layer in layers]
        try:
            for start in range(0, len(windows), self.batch_size):
                batch = torch.tensor(windows[start : start + self.batch_size], dtype=torch.long, device=model.device)
                captured.clear()
                with torch.inference_mode():
                    try:
                        model(input_ids=batch, use_cache=False)
                    except _StopForward:
                        pass
                yield start, {layer: captured[layer].float().cpu().numpy() for layer in layers}
        finally:
            for handle in handles:
                handle.remove()
