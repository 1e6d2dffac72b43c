"""Tiny sparse coders in sparsify's and SAELens' layouts, with planted latents that fire on known words.

`write_planted_coders(model, corpus, folder)` writes, for `tiny_models.build_token_neuron_model`'s GPT-2
(3 layers), a units folder of three coders:

- `h.0`: a sparsify SAE on the residual stream after layer 0 (topk, k=2);
- `h.1.mlp`: a sparsify transcoder on layer 1's MLP (it reads the MLP's input; groupmax, k=2);
- `blocks.2.hook_resid_post`: a SAELens JumpReLU SAE on the residual stream after layer 2.

Each has 8 latents. Latent i < len(words) fires on words[i]: the token-neuron model writes +L and -L
into a pair of residual dimensions (p, q) on the word's tokens only, so the latent reads x_p - x_q, less
a threshold set halfway between the word's tokens and every other token of the corpus (measured here,
at the coder's hookpoint), and its decoder row is the word's unembedding row (centred, like what
GPT-2's final LayerNorm gives back), so that it promotes the word. Latents 3-5 read other dimensions
weakly; latents 6 and 7 never fire (dead).
"""

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from tiny_models import word_fires
from transformers import AutoModelForCausalLM, AutoTokenizer

N_LATENTS, K = 8, 2
DEAD = (6, 7)
HOOKPOINTS = {0: "h.0", 1: "h.1.mlp", 2: "blocks.2.hook_resid_post"}


def hookpoint_inputs(model, windows: np.ndarray) -> dict[int, torch.Tensor]:
    """What each coder reads, [windows, tokens, width]: block 0's output, block 1's MLP input, block 2's output."""
    seen: dict[int, list] = {0: [], 1: [], 2: []}
    blocks = model.transformer.h
    handles = [blocks[0].register_forward_hook(lambda m, a, out: seen[0].append(out[0] if isinstance(out, tuple) else out)),
               blocks[1].mlp.register_forward_pre_hook(lambda m, a: seen[1].append(a[0])),
               blocks[2].register_forward_hook(lambda m, a, out: seen[2].append(out[0] if isinstance(out, tuple) else out))]
    with torch.no_grad():
        model(input_ids=torch.tensor(windows))
    for h in handles:
        h.remove()
    return {layer: xs[0] for layer, xs in seen.items()}


def planted_weights(model, tokenizer, x: torch.Tensor, tokens: list[list[str]], words: list[str], seed: int
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(encoder [latents, width], encoder bias, decoder [latents, width]) for inputs x [W, T, width]."""
    width = x.shape[-1]
    generator = torch.Generator().manual_seed(seed)
    encoder = torch.zeros(N_LATENTS, width)
    bias = torch.zeros(N_LATENTS)
    decoder = torch.randn(N_LATENTS, width, generator=generator)
    unembedding = model.get_output_embeddings().weight
    for i, word in enumerate(words):
        p, q = width - 1 - 2 * i, width - 2 - 2 * i  # build_token_neuron_model's pair of the i-th distinct word
        read = (x[..., p] - x[..., q]).reshape(-1)
        on = torch.tensor([f for window in tokens for f in word_fires(window, word)])
        assert on.any() and (~on).any(), word
        low, high = read[~on].max(), read[on].min()
        assert low < high, f"{word!r} is not separable at this hookpoint: {float(low)} >= {float(high)}"
        encoder[i, p], encoder[i, q] = 1.0, -1.0
        bias[i] = -(low + high) / 2
        row = unembedding[tokenizer(word, add_special_tokens=False)["input_ids"][0]].detach()
        decoder[i] = 10 * (row - row.mean())
    for i in range(len(words), N_LATENTS):
        encoder[i, : width // 2] = 0.01 * torch.randn(width // 2, generator=generator)
    bias[list(DEAD)] = -1e4
    return encoder, bias, decoder


def _sparsify(folder: Path, encoder, bias, decoder, activation: str, transcode: bool) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    width = encoder.shape[1]
    save_file({"encoder.weight": encoder.contiguous(), "encoder.bias": bias, "W_dec": decoder.contiguous(),
               "b_dec": torch.zeros(width)}, folder / "sae.safetensors")
    (folder / "cfg.json").write_text(json.dumps({
        "activation": activation, "expansion_factor": 32, "normalize_decoder": True, "num_latents": N_LATENTS,
        "k": K, "multi_topk": False, "skip_connection": False, "transcode": transcode, "d_in": width}))


def _saelens(folder: Path, hook: str, encoder, bias, decoder) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    width = encoder.shape[1]
    save_file({"W_enc": encoder.T.contiguous(), "b_enc": bias, "W_dec": decoder.contiguous(),
               "b_dec": torch.zeros(width), "threshold": torch.full((N_LATENTS,), 0.01)},
              folder / "sae_weights.safetensors")
    (folder / "cfg.json").write_text(json.dumps({
        "architecture": "jumprelu", "d_in": width, "d_sae": N_LATENTS, "dtype": "float32", "device": "cpu",
        "apply_b_dec_to_input": True, "normalize_activations": "none", "reshape_activations": "none",
        "metadata": {"hook_name": hook, "model_name": "tiny-gpt2"}}))


def write_planted_coders(model_path: Path, windows: np.ndarray, words: list[str], folder: Path, seed: int = 0) -> Path:
    """The units folder described above, for the corpus windows `windows` (token ids [W, T])."""
    model = AutoModelForCausalLM.from_pretrained(model_path)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    tokens = [[tokenizer.decode([t]) for t in window] for window in windows]
    inputs = hookpoint_inputs(model, windows)
    weights = {layer: planted_weights(model, tokenizer, inputs[layer], tokens, words, seed + layer) for layer in inputs}
    _sparsify(folder / HOOKPOINTS[0], *weights[0], activation="topk", transcode=False)
    _sparsify(folder / HOOKPOINTS[1], *weights[1], activation="groupmax", transcode=True)
    _saelens(folder / "resid_post_2", HOOKPOINTS[2], *weights[2])
    return folder
