"""The subject model: the language model whose units are explained, its MLP neurons (NEURON_ASSETS_UNITS=mlp)
or the latents of sparse coders that read it (resources/coders.py)."""

import functools
import hashlib
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from dagster import ConfigurableResource

from neuron_assets.resources.coders import Coder, coder_hash, encode, load_weights, read_units
from neuron_assets.resources.models import (
    ModelShape,
    base_module_names,
    describe_model,
    layer_list,
    layer_weight_hashes,
    load_causal_lm,
    model_shape,
    neuron_directions,
    neuron_module,
    output_logits,
    resolve_model,
)
from neuron_assets.settings import MLP_UNITS


class _StopForward(Exception):
    """Raised by the deepest requested layer's hook: nothing after it is ever computed."""


@dataclass(frozen=True)
class UnitShape:
    """What partitions need to know about the units: the layers that have them and how many each has."""

    n_layers: int  # of the model
    layers: list[int]  # the layers with units: all for MLP neurons, those with a coder otherwise
    n_units: int  # per layer
    hookpoints: dict[int, str]  # per layer, the coder's hookpoint (empty for MLP neurons)


@functools.lru_cache(maxsize=8)
def _module_names(path: str, cache: str) -> frozenset[str]:
    return frozenset(base_module_names(path, cache))


class SubjectModel(ConfigurableResource):
    """A Hugging Face causal LM, read at the input of each MLP output projection, or at the hookpoints
    of the sparse coders in `units`."""

    model: str = "embedded"
    cache: str = "~/.cache/neuron_assets"
    device: str = "auto"
    batch_size: int = 16
    units: str = MLP_UNITS

    @property
    def label(self) -> str:
        return describe_model(self.model) + ("" if self.units == MLP_UNITS else f", latents of {self.units}")

    def shape(self) -> ModelShape:
        return model_shape(self.model, self.cache)

    def coders(self) -> dict[int, Coder]:
        """{layer: its sparse coder}, checked against the model; empty for MLP neurons."""
        if self.units == MLP_UNITS:
            return {}
        shape = self.shape()
        modules = _module_names(resolve_model(self.model, self.cache), self.cache)
        return read_units(self.units, self.cache, layer_list(shape.model_type)[1], shape.width, set(modules))

    def unit_shape(self) -> UnitShape:
        shape, coders = self.shape(), self.coders()
        if not coders:
            return UnitShape(shape.n_layers, list(range(shape.n_layers)), shape.n_neurons, {})
        return UnitShape(shape.n_layers, list(coders), next(iter(coders.values())).n_latents,
                         {layer: coder.hookpoint for layer, coder in coders.items()})

    def load(self):
        return load_causal_lm(self.model, self.cache, self.device)

    def tokenizer(self):
        return self.load()[1]

    def layer_hashes(self, layers: list[int]) -> dict[int, str]:
        """{layer: hash of what that layer's units are computed from}: the model's weights (read from the
        checkpoint on disk, not the cached model), and for a coder's latents its files too."""
        hashes = layer_weight_hashes(self.model, self.cache, layers, self.device)
        coders = self.coders()
        if not coders:
            return hashes
        return {layer: hashlib.sha256(f"{hashes[layer]}|{coder_hash(coders[layer])}".encode()).hexdigest()[:16]
                for layer in layers}

    def promoted_tokens(self, layer: int, units: list[int], k: int, chunk: int = 512) -> tuple[np.ndarray, np.ndarray]:
        """(token ids, logits), int64 and float32 [len(units), k], best first: per unit of `layer` in
        `units`, the k tokens its output direction (an MLP neuron's output weights, a latent's decoder
        row) promotes most through the final norm and the unembedding (resources/models.py
        `output_logits`)."""
        model, _ = self.load()
        coder = self.coders().get(layer)
        decoder = load_weights(coder, model.device).decoder if coder else None
        ids, logits = [np.zeros((0, k), dtype=np.int64)], [np.zeros((0, k), dtype=np.float32)]
        with torch.inference_mode():
            for start in range(0, len(units), chunk):  # bounded memory: chunk x vocabulary logits at a time
                rows = units[start:start + chunk]
                directions = decoder[rows] if coder else neuron_directions(model, layer, rows)
                top = torch.topk(output_logits(model, directions), k, dim=-1)
                ids.append(top.indices.cpu().numpy())
                logits.append(top.values.cpu().numpy())
        return np.concatenate(ids), np.concatenate(logits)

    def torch_device(self) -> torch.device:
        """Where the model runs (the `device` setting resolved)."""
        return self.load()[0].device

    def unit_activations(self, windows: np.ndarray, layers: list[int],
                         on_device: bool = False) -> Iterator[tuple[int, dict]]:
        """Yield (first window index, {layer: float32 [B, T, units]}) per batch of token windows: numpy
        arrays, or with `on_device` tensors left on the model's device.

        One forward pass per batch serves every requested layer; it stops inside the deepest
        requested layer, so deeper layers and the LM head are never computed. A coder's latents are
        encoded from its hookpoint in that same pass, never written anywhere.
        """
        model, _ = self.load()
        captured: dict[int, torch.Tensor] = {}
        deepest = max(layers)
        coders = self.coders()
        weights = {layer: load_weights(coders[layer], model.device) for layer in layers if layer in coders}

        def keep(layer, x):
            captured[layer] = encode(weights[layer], x.detach()) if layer in weights else x.detach()
            if layer == deepest:
                raise _StopForward

        def hook(layer, module):
            coder = coders.get(layer)
            if coder is None:  # an MLP neuron's activation: the input of its layer's output projection
                return neuron_module(model, layer).register_forward_pre_hook(lambda m, args: keep(layer, args[0]))
            if coder.reads == "output":
                return module.register_forward_hook(
                    lambda m, args, out: keep(layer, out[0] if isinstance(out, tuple) else out))
            return module.register_forward_pre_hook(
                lambda m, args, kwargs: keep(layer, args[0] if args else kwargs["hidden_states"]), with_kwargs=True)

        handles = [hook(layer, model.base_model.get_submodule(coders[layer].module) if layer in coders else None)
                   for layer in layers]
        try:
            for start in range(0, len(windows), self.batch_size):
                batch = torch.tensor(windows[start : start + self.batch_size], dtype=torch.long, device=model.device)
                captured.clear()
                with torch.inference_mode():
                    try:
                        model(input_ids=batch, use_cache=False)
                    except _StopForward:
                        pass
                acts = {layer: captured[layer].float() for layer in layers}
                yield start, acts if on_device else {layer: a.cpu().numpy() for layer, a in acts.items()}
        finally:
            for handle in handles:
                handle.remove()
