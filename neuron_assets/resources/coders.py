"""Sparse coders (SAEs and transcoders) whose latents are the units explained, read from a folder.

NEURON_ASSETS_UNITS names a local or s3:// folder with one sub-folder per coder, in either layout:

- EleutherAI sparsify: the sub-folder is named by the hookpoint, a module path under the model's base
  model (`layers.3` is the residual stream after layer 3 of a Llama, `h.3` of a GPT-2; `layers.3.mlp`
  the MLP). It holds `cfg.json` (activation 'topk' or 'groupmax', k, num_latents or expansion_factor,
  transcode, skip_connection, d_in) and `sae.safetensors` (encoder.weight [latents, d_in],
  encoder.bias, W_dec [latents, d_in], b_dec, optional W_skip). An SAE reads the module's output;
  a transcoder (transcode: true) reads its input and predicts its output.
- SAELens: `cfg.json` (architecture 'standard', 'jumprelu' or 'topk', d_in, d_sae, the hook name at
  `metadata.hook_name` or `hook_name`) and `sae_weights.safetensors` (W_enc [d_in, d_sae], b_enc,
  W_dec [d_sae, d_in], b_dec, and threshold for JumpReLU). Hook names are TransformerLens':
  blocks.L.hook_resid_pre / hook_resid_post / hook_mlp_out, and blocks.L.ln2.hook_normalized (the
  MLP's input).

Everything is checked from the config files and the safetensors headers, without loading a tensor,
when the definitions are built: a bad folder fails before any run writes anything.
"""

import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from upath import UPath

from neuron_assets.resources.files import s3_errors
from neuron_assets.resources.models import ModelFileError, check_safetensors
from neuron_assets.settings import MLP_UNITS

SETTING = "NEURON_ASSETS_UNITS"
CONFIG = "cfg.json"
SPARSIFY, SAELENS = "sparsify", "saelens"
WEIGHTS = {SPARSIFY: "sae.safetensors", SAELENS: "sae_weights.safetensors"}
ACTIVATIONS = {SPARSIFY: ("topk", "groupmax"), SAELENS: ("standard", "jumprelu", "topk")}
# SAELens hook name -> (module under the base model, with {} for the layer; which side it reads)
SAELENS_HOOKS = {
    "hook_resid_pre": ("{block}", "input"),
    "hook_resid_post": ("{block}", "output"),
    "hook_mlp_out": ("{block}.mlp", "output"),
    "ln2.hook_normalized": ("{block}.mlp", "input"),
}


class CoderError(ValueError):
    """A units folder or coder file that cannot be used; the message names the file and what to do."""


@dataclass(frozen=True)
class Coder:
    """One sparse coder, as its files describe it (no tensor loaded)."""

    folder: Path  # local: cfg.json and the weights file
    layout: str  # SPARSIFY or SAELENS
    hookpoint: str  # as the coder's files name it: "layers.3", "blocks.3.hook_resid_post"
    module: str  # the module it reads, under the model's base model: "layers.3", "h.3.mlp"
    reads: str  # "output" or "input" of that module
    layer: int
    d_in: int
    n_latents: int
    activation: str  # topk, groupmax (sparsify); standard (ReLU), jumprelu, topk (SAELens)
    k: int  # latents kept per token by topk and groupmax (0 otherwise)
    subtract_decoder_bias: bool  # the input minus b_dec is encoded
    scale_by_decoder_norm: bool  # SAELens topk's rescale_acts_by_decoder_norm
    kind: str  # "sae" (decodes what it reads) or "transcoder" (predicts the module's output from its input)

    @property
    def weights(self) -> Path:
        return self.folder / WEIGHTS[self.layout]

    def describe(self) -> str:
        return f"{self.kind} {self.hookpoint} ({self.layout}, {self.n_latents} latents, {self.activation})"


def _fail(path, problem: str, fix: str) -> CoderError:
    return CoderError(f"{SETTING}: {path}: {problem}. {fix}")


def _config(folder: Path) -> dict:
    file = folder / CONFIG
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise _fail(file, f"is not JSON ({error})", "Copy the coder's cfg.json again") from None
    if not isinstance(config, dict):
        raise _fail(file, "is not a JSON object", "Copy the coder's cfg.json again")
    return config


def _field(config: dict, name: str, file: Path, kind=int, default=None):
    value = config.get(name, default)
    if value is None or not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise _fail(file, f"field {name!r} is {value!r}, not a {kind.__name__}", "Write the coder's cfg.json as "
                    "its library saved it")
    return value


def tensor_shapes(file: Path) -> dict[str, tuple[int, ...]]:
    """{name: shape} from a safetensors file's header; a truncated or foreign file is a CoderError."""
    if not file.is_file():
        raise _fail(file, "is missing", f"Each coder folder needs {CONFIG} and its weights file")
    try:
        check_safetensors(file)
    except ModelFileError as error:
        raise CoderError(f"{SETTING}: {error}. Copy the coder's files again") from None
    with file.open("rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    return {name: tuple(v["shape"]) for name, v in header.items() if name != "__metadata__"}


def _layer_of(module: str, blocks: str, path: Path) -> int:
    """The layer of a module path under the base model: the number after the block list ('layers.3.mlp' -> 3)."""
    match = re.fullmatch(rf"{re.escape(blocks)}\.(\d+)(\..+)?", module)
    if not match:
        raise _fail(path, f"hookpoint {module!r} is not inside a layer of the model (its layers are "
                    f"{blocks}.0, {blocks}.1, ...)", f"Name the sub-folder by a module of a layer, e.g. {blocks}.3 "
                    f"or {blocks}.3.mlp")
    return int(match.group(1))


def _sparsify(folder: Path, blocks: str) -> Coder:
    file = folder / CONFIG
    config = _config(folder)
    activation = config.get("activation", "topk")
    if activation not in ACTIVATIONS[SPARSIFY]:
        raise _fail(file, f"activation {activation!r} is not one sparsify writes", "Use 'topk' or 'groupmax'")
    d_in = _field(config, "d_in", file)
    n_latents = _field(config, "num_latents", file, default=0) or d_in * _field(config, "expansion_factor", file,
                                                                                 default=32)
    k = _field(config, "k", file, default=32)
    if not 0 < k <= n_latents:
        raise _fail(file, f"k={k} is not between 1 and the {n_latents} latents", "Fix k")
    if activation == "groupmax" and n_latents % k:
        raise _fail(file, f"groupmax needs the {n_latents} latents to split into k={k} equal groups",
                    "Fix num_latents or k")
    transcode = _field(config, "transcode", file, bool, default=False)
    shapes = tensor_shapes(folder / WEIGHTS[SPARSIFY])
    expected = {"encoder.weight": (n_latents, d_in), "encoder.bias": (n_latents,), "W_dec": (n_latents, d_in),
                "b_dec": (d_in,)}
    if _field(config, "skip_connection", file, bool, default=False):
        expected["W_skip"] = (d_in, d_in)
    _check_shapes(folder / WEIGHTS[SPARSIFY], shapes, expected)
    module = folder.name
    return Coder(folder, SPARSIFY, module, module, "input" if transcode else "output", _layer_of(module, blocks, folder),
                 d_in, n_latents, activation, k, subtract_decoder_bias=not transcode, scale_by_decoder_norm=False,
                 kind="transcoder" if transcode else "sae")


def _saelens(folder: Path, blocks: str) -> Coder:
    file = folder / CONFIG
    config = _config(folder)
    architecture = config.get("architecture")
    if architecture is None:  # configs before SAELens 6 name the activation function instead
        architecture = {"relu": "standard", "topk": "topk"}.get(config.get("activation_fn_str", "relu"),
                                                                 config.get("activation_fn_str"))
    if architecture not in ACTIVATIONS[SAELENS]:
        raise _fail(file, f"architecture {architecture!r} is not supported",
                    f"Use one of {', '.join(ACTIVATIONS[SAELENS])} (ReLU, JumpReLU, top-k)")
    normalize = config.get("normalize_activations", "none")
    if normalize not in ("none", None):
        raise _fail(file, f"normalize_activations={normalize!r} needs statistics of the training data",
                    "Fold the scaling into the weights (SAELens: fold_activation_norm_scaling_factor) and save again")
    hook = (config.get("metadata") or {}).get("hook_name") or config.get("hook_name")
    match = re.fullmatch(r"blocks\.(\d+)\.(.+)", hook or "")
    if not match or match.group(2) not in SAELENS_HOOKS:
        raise _fail(file, f"hook name {hook!r} is not one this tool reads",
                    "Use blocks.L." + ", blocks.L.".join(SAELENS_HOOKS))
    layer = int(match.group(1))
    pattern, reads = SAELENS_HOOKS[match.group(2)]
    d_in, d_sae = _field(config, "d_in", file), _field(config, "d_sae", file)
    k = _field(config, "k", file, default=(config.get("activation_fn_kwargs") or {}).get("k")) \
        if architecture == "topk" else 0
    if architecture == "topk" and not 0 < k <= d_sae:
        raise _fail(file, f"k={k} is not between 1 and the {d_sae} latents", "Fix k")
    expected = {"W_enc": (d_in, d_sae), "b_enc": (d_sae,), "W_dec": (d_sae, d_in), "b_dec": (d_in,)}
    if architecture == "jumprelu":
        expected["threshold"] = (d_sae,)
    _check_shapes(folder / WEIGHTS[SAELENS], tensor_shapes(folder / WEIGHTS[SAELENS]), expected)
    return Coder(folder, SAELENS, hook, pattern.format(block=f"{blocks}.{layer}"), reads, layer, d_in, d_sae,
                 architecture, k, subtract_decoder_bias=bool(config.get("apply_b_dec_to_input", True)),
                 scale_by_decoder_norm=bool(config.get("rescale_acts_by_decoder_norm", False)), kind="sae")


def _check_shapes(file: Path, shapes: dict, expected: dict) -> None:
    for name, shape in expected.items():
        if name not in shapes:
            raise _fail(file, f"has no tensor {name!r} (it has {', '.join(sorted(shapes)) or 'none'})",
                        "Copy the coder's weights again, or check that the layout matches its files")
        if shapes[name] != shape:
            raise _fail(file, f"tensor {name!r} has shape {list(shapes[name])}, but its {CONFIG} makes it {list(shape)}",
                        "Copy the coder's files again, from one training run")


def read_coder(folder: Path, blocks: str) -> Coder:
    """The coder in `folder`, by the weights file it holds; `blocks` is the path of the model's
    layer list under its base model ('layers', 'h')."""
    for layout, weights in WEIGHTS.items():
        if (folder / weights).exists():
            if not (folder / CONFIG).is_file():
                raise _fail(folder / CONFIG, "is missing", f"Each coder folder needs {CONFIG} beside {weights}")
            return (_sparsify if layout == SPARSIFY else _saelens)(folder, blocks)
    raise _fail(folder, f"holds neither {WEIGHTS[SPARSIFY]} (sparsify) nor {WEIGHTS[SAELENS]} (SAELens)",
                "Copy the coder's files into it, or remove the folder")


def local_folder(units: str, cache: str) -> Path:
    """A local folder with the coders of `units`; an s3:// folder is copied once into the cache
    (again when a file's size or ETag changes)."""
    if "://" not in units:
        folder = Path(units).expanduser()
        if not folder.is_dir():
            raise CoderError(f"{SETTING}={units!r}: no such folder. Write '{MLP_UNITS}' for the MLP neurons, "
                             "or the path of a folder with one sub-folder per coder")
        return folder
    root = UPath(units)
    with s3_errors(units, "read", SETTING):
        if not root.exists():
            raise CoderError(f"{SETTING}={units!r}: no such folder")
        files = sorted(p for p in root.rglob("*") if p.is_file())
        infos = [p.fs.info(p.path) for p in files]
        names = [p.path.removeprefix(root.path).lstrip("/") for p in files]
        stamps = [(name, info.get("ETag"), info.get("size")) for name, info in zip(names, infos)]
        target = Path(cache).expanduser() / "units" / hashlib.sha256(
            json.dumps([units, stamps], default=str).encode()).hexdigest()[:16]
        if not target.is_dir():
            partial = target.with_name(f"{target.name}.partial-{os.getpid()}")
            for p, name in zip(files, names):
                (partial / name).parent.mkdir(parents=True, exist_ok=True)
                (partial / name).write_bytes(p.read_bytes())
            try:
                partial.rename(target)  # atomic: a step never reads a half-copied folder
            except OSError:  # another process copied it first
                shutil.rmtree(partial, ignore_errors=True)
    return target


def read_units(units: str, cache: str, blocks: str, d_model: int, modules: set[str]) -> dict[int, Coder]:
    """{layer: its coder} of the units folder, checked against the model: `d_model` its width and
    `modules` the names of the modules under its base model. One coder per layer, every coder with
    the same number of latents (the shards split them)."""
    folder = local_folder(units, cache)
    subfolders = sorted(p for p in folder.iterdir() if p.is_dir())
    if not subfolders:
        raise CoderError(f"{SETTING}={units!r} holds no coder folder: give a folder with one sub-folder per "
                         f"coder ({CONFIG} and {WEIGHTS[SPARSIFY]} or {WEIGHTS[SAELENS]})")
    coders: dict[int, Coder] = {}
    for sub in subfolders:
        coder = read_coder(sub, blocks)
        if coder.module not in modules:
            raise _fail(sub, f"hookpoint {coder.hookpoint!r} is not a module of the model",
                        f"Name a module of a layer, e.g. {blocks}.{coder.layer} or {blocks}.{coder.layer}.mlp")
        if coder.d_in != d_model:
            raise _fail(sub / CONFIG, f"d_in is {coder.d_in}, but {coder.hookpoint!r} has width {d_model}",
                        "Use coders trained on this model")
        if coder.layer in coders:
            raise _fail(sub, f"is a second coder for layer {coder.layer} (with {coders[coder.layer].folder.name})",
                        "Keep one coder per layer: a layer partition explains one hookpoint")
        coders[coder.layer] = coder
    widths = {c.n_latents for c in coders.values()}
    if len(widths) > 1:
        shown = ", ".join(f"{c.folder.name}: {c.n_latents}" for c in coders.values())
        raise CoderError(f"{SETTING}={units!r}: the coders have different numbers of latents ({shown}); the "
                         "shards split every layer alike, so use one folder per width")
    return dict(sorted(coders.items()))


def coder_hash(coder: Coder) -> str:
    """sha256 (16 hex) of the coder's config and weights bytes: a retrained coder gets a new one."""
    digest = hashlib.sha256()
    for file in (coder.folder / CONFIG, coder.weights):
        with file.open("rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                digest.update(block)
    return digest.hexdigest()[:16]


@dataclass
class CoderWeights:
    """A coder's tensors, float32 on one device, in one orientation: encoder [d_in, latents], decoder [latents, d_in]."""

    coder: Coder
    encoder: torch.Tensor
    encoder_bias: torch.Tensor
    decoder: torch.Tensor
    decoder_bias: torch.Tensor
    threshold: torch.Tensor | None


def load_weights(coder: Coder, device) -> CoderWeights:
    from safetensors import safe_open

    with safe_open(str(coder.weights), framework="pt", device="cpu") as f:
        def get(name):
            return f.get_tensor(name).float().to(device)

        if coder.layout == SPARSIFY:
            return CoderWeights(coder, get("encoder.weight").T.contiguous(), get("encoder.bias"), get("W_dec"),
                                get("b_dec"), None)
        return CoderWeights(coder, get("W_enc"), get("b_enc"), get("W_dec"), get("b_dec"),
                            get("threshold") if coder.activation == "jumprelu" else None)


def encode(weights: CoderWeights, x: torch.Tensor) -> torch.Tensor:
    """Latent activations [..., latents] of inputs x [..., d_in]:

        pre = (x - b_dec if the coder subtracts it) @ W_enc + b_enc   (times |W_dec row| if it rescales)
        standard: relu(pre);  jumprelu: relu(pre) * [pre > threshold]
        topk: relu(pre) at each token's k largest, else 0;  groupmax: relu(pre) at each of k equal groups' largest
    """
    coder = weights.coder
    x = x.float()
    if coder.subtract_decoder_bias:
        x = x - weights.decoder_bias
    pre = x @ weights.encoder + weights.encoder_bias
    if coder.scale_by_decoder_norm:
        pre = pre * weights.decoder.norm(dim=-1)
    acts = torch.relu(pre)
    if coder.activation == "jumprelu":
        return acts * (pre > weights.threshold)
    if coder.activation == "topk":
        top = acts.topk(coder.k, dim=-1)
        return torch.zeros_like(acts).scatter_(-1, top.indices, top.values)
    if coder.activation == "groupmax":
        groups = acts.unflatten(-1, (coder.k, -1))
        best = groups.max(dim=-1, keepdim=True)
        return torch.zeros_like(groups).scatter_(-1, best.indices, best.values).flatten(-2)
    return acts
