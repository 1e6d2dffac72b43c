"""The data version of each settings source: a hash of the settings that enter it and of what they
point at, so that a changed setting, a model rewritten in place or an edited corpus makes exactly
the assets that read it stale. No Dagster import: the settings source assets, the assets that
reuse earlier rows and the CLI's checks before a run all call these functions.

A version is 16 hex digits of sha256. Identities are cheap to compute (file names, sizes and
modification times or ETags, never the bytes of a model or a corpus), except the import source,
whose files are small and whose content is hashed.
"""

import hashlib
import json
from urllib.parse import urlsplit

from upath import UPath

from neuron_assets.resources.files import s3_errors
from neuron_assets.settings import EMBEDDED_CORPUS, EMBEDDED_MODEL, SETTINGS, SOURCES, Settings

NO_ENDPOINT = "api.openai.com"  # what an empty base URL means to the openai client


def digest(value) -> str:
    """sha256 (16 hex) of a JSON-serialisable value, keys sorted."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _files(root: UPath) -> list[UPath]:
    if root.is_file():
        return [root]
    return sorted(p for p in root.rglob("*") if p.is_file())


def _existing(path: str, setting: str) -> UPath:
    """`path` as a UPath; a missing path is a ValueError naming the setting: it cannot be versioned,
    so nothing should run on it."""
    root = UPath(path).expanduser()
    with s3_errors(str(root), "read"):
        if not root.exists():
            raise ValueError(f"{setting}={path!r}: no such file or folder, so it cannot be versioned; "
                             "fix the path or unset it")
    return root


def file_identity(path: str, setting: str) -> list:
    """[name, size, mtime or ETag] of every file at or under `path` (local or s3://)."""
    root = _existing(path, setting)
    with s3_errors(str(root), "read"):
        out = []
        for p in _files(root):
            info = p.fs.info(p.path)
            stamp = info.get("ETag") or info.get("mtime") or info.get("LastModified") or info.get("created")
            out.append([p.path.removeprefix(root.path) or p.name, info.get("size"), str(stamp)])
    return out


def content_hash(path: str, setting: str) -> str:
    """sha256 (16 hex) of the names and bytes of every file at or under `path` (local or s3://)."""
    root = _existing(path, setting)
    with s3_errors(str(root), "read"):
        h = hashlib.sha256()
        for p in _files(root):
            h.update(p.path.removeprefix(root.path).encode() + b"\0")
            h.update(p.read_bytes())
    return h.hexdigest()[:16]


def model_identity(name: str, setting: str) -> list:
    """What identifies a local model: the embedded model's file, or the files of a directory or a
    .gguf file; a name in the Hub cache is taken as it is."""
    if name == EMBEDDED_MODEL:
        from neuron_assets.resources.models import embedded_model_file

        return file_identity(str(embedded_model_file()), setting)
    if UPath(name).expanduser().exists():
        return file_identity(name, setting)
    return [name]


TOKENIZER_FILES = ("tokenizer*", "vocab*", "merges*", "special_tokens_map.json", "added_tokens.json", "*.model")


def tokenizer_identity(name: str, setting: str) -> list:
    """What identifies a model's tokenizer: the tokenizer files of a model directory (so new weights
    alone do not re-cut the corpus), else the model's identity (a .gguf file holds both)."""
    root = UPath(name).expanduser()
    if name != EMBEDDED_MODEL and root.is_dir():
        files = sorted({p for pattern in TOKENIZER_FILES for p in root.glob(pattern) if p.is_file()})
        if files:
            return [file_identity(str(p), setting) for p in files]
    return model_identity(name, setting)


def endpoint_identity(base_url: str, setting: str) -> str:
    """scheme://host:port/path of an OpenAI-compatible endpoint, without credentials or a trailing
    slash; an empty URL is OpenAI's. Anything else cannot be identified and is a ValueError."""
    if not base_url:
        return NO_ENDPOINT
    parts = urlsplit(base_url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{setting}={base_url!r} is not an http(s) URL, so the endpoint cannot be identified; "
                         "write e.g. http://127.0.0.1:8000/v1, or leave it empty for OpenAI")
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{parts.hostname.lower()}{port}{parts.path.rstrip('/')}"


def llm_version(backend: str, model: str, base_url: str | None, method: str | None, role: str,
                dtype: str = "auto") -> str:
    """The version of an explainer or simulator: backend, model identity, endpoint (and, for a
    simulator, the simulation method). `role` is 'explainer' or 'simulator' (names the settings).
    A local model's number format enters where it is pinned: 'auto' follows the device, which,
    like NEURON_ASSETS_DEVICE, makes nothing stale."""
    prefix = f"NEURON_ASSETS_{role.upper()}"
    if backend == "local":
        identity = ["local", model_identity(model, f"{prefix}_MODEL")] + ([dtype] if dtype != "auto" else [])
    else:
        identity = [backend, model, endpoint_identity(base_url or "", f"{prefix}_BASE_URL")]
    return digest(identity + ([method] if method else []))


def _corpus_identity(settings: Settings) -> list:
    if settings.corpus == EMBEDDED_CORPUS:
        import pydoc_data.topics

        return file_identity(pydoc_data.topics.__file__, "NEURON_ASSETS_CORPUS")
    return file_identity(settings.corpus, "NEURON_ASSETS_CORPUS")


def source_settings(settings: Settings, source: str) -> dict[str, str]:
    """{environment variable: value} of the settings that enter `source`."""
    values = settings.environment()
    return {s.env: values[s.env] for s in SETTINGS if s.enters == source and s.env in values}


def source_version(settings: Settings, source: str) -> str:
    """The data version of one settings source (a name of `SOURCES`)."""
    if source not in SOURCES:
        raise KeyError(f"unknown settings source {source!r}; the sources are {', '.join(SOURCES)}")
    values = source_settings(settings, source)
    if source == "corpus_source":
        return digest([values, _corpus_identity(settings)])
    if source == "tokenization":
        return digest([values, tokenizer_identity(settings.model, "NEURON_ASSETS_MODEL")])
    if source == "explainer":
        return llm_version(settings.explainer_backend, settings.explainer_model, settings.explainer_base_url,
                           None, "explainer", settings.explainer_dtype)
    if source == "simulator":
        return llm_version(settings.simulator_backend, settings.simulator_model, settings.simulator_base_url,
                           settings.simulation_method, "simulator", settings.simulator_dtype)
    if source == "import_source":
        return digest([values, content_hash(settings.import_from, "NEURON_ASSETS_IMPORT_FROM")])
    return digest(values)


def sources_in_force(settings: Settings) -> list[str]:
    """The settings sources of these settings' graph (import_source only when there is an import)."""
    return [s for s in SOURCES if s != "import_source" or settings.import_from]


def source_versions(settings: Settings) -> dict[str, str]:
    """Every settings source's version; a setting that cannot be versioned raises a ValueError
    naming it (what the CLI checks before any run)."""
    return {source: source_version(settings, source) for source in sources_in_force(settings)}
