"""The one Definitions object: assets, checks, resources, sensors and schedules, built from the settings."""

import inspect
import json
import os
from pathlib import Path

import yaml
from dagster import Definitions, EnvVar, definitions, map_asset_specs

from neuron_assets.assets.activations import build_neuron_records
from neuron_assets.assets.corpus import corpus_documents, corpus_tokens
from neuron_assets.assets.detection import build_detection_scores
from neuron_assets.assets.embedding import build_embedding_scores
from neuron_assets.assets.explanations import build_explanations
from neuron_assets.assets.interchange import build_exported_neurons, build_imported_explanations
from neuron_assets.assets.revisions import build_revised_explanations
from neuron_assets.assets.scores import build_layer_summary, build_model_summary, build_scores
from neuron_assets.assets.settings_sources import build_settings_sources
from neuron_assets.assets.simulations import build_simulations
from neuron_assets.assets.viewer import build_neuron_viewer, build_neuron_viewer_index
from neuron_assets.assets.weights import build_subject_model_weights
from neuron_assets.automation import automation_sensor, build_nightly_schedule, build_refresh_sensor
from neuron_assets.method import detection, output, prompts, revision
from neuron_assets.method.prompts import load_fewshot, prompt_version
from neuron_assets.partitions import build_layout
from neuron_assets.resources.corpus import CorpusSource
from neuron_assets.resources.embedder import Embedder, embedder_identity
from neuron_assets.resources.llm import LLM
from neuron_assets.resources.storage import TableStorage
from neuron_assets.resources.study import Study
from neuron_assets.resources.subject_model import SubjectModel
from neuron_assets.settings import SETTINGS, Settings, api_key_variable, check_neurons
from neuron_assets.versions import digest

K8S_EXECUTOR = Path(__file__).resolve().parents[1] / "resources" / "k8s" / "executor.yaml"


def build_definitions(settings: Settings, code_versions: dict[str, str] | None = None) -> Definitions:
    """`code_versions` replaces the code version of the named assets (tests: what a code change reruns)."""
    subject_model = subject_model_of(settings)
    layout = build_layout(settings.layers, subject_model.unit_shape(), settings.shards)
    check_neurons(settings.neurons, layout.n_units)
    study = Study(seq_len=settings.seq_len, max_windows=settings.max_windows, top_records=settings.top_records,
                  random_records=settings.random_records, neurons=settings.neurons,
                  min_activation_frequency=float(settings.min_activation_frequency),
                  output_variants=settings.output_variants == "on", seed=settings.seed)
    explainer_fewshot = load_fewshot(f"{study.prompts}/explainer_fewshot.json")
    simulator_fewshot = load_fewshot(f"{study.prompts}/simulator_fewshot.json")
    # The prompt wording lives in method/prompts.py, so its source is part of each prompt version.
    wording = inspect.getsource(prompts)
    explainer_version = prompt_version(json.dumps(explainer_fewshot, sort_keys=True), wording)
    simulator_version = prompt_version(json.dumps(simulator_fewshot, sort_keys=True), wording)
    # The explanation assets whose variants are simulated and scored; the settings choose the optional ones.
    optional = []
    if settings.revision == "on":
        revision_version = prompt_version(explainer_version, inspect.getsource(revision))
        optional.append(build_revised_explanations(layout, revision_version, simulator_version, simulator_fewshot))
    if settings.import_from:
        optional.append(build_imported_explanations(layout, settings.import_from))
    sources = ["explanations", *(a.key.to_user_string() for a in optional)]
    control = settings.control == "shuffled"
    assets = [
        corpus_documents,
        corpus_tokens,
        build_neuron_records(layout),
        # the output variants' wording (method/output.py) versions their explanations only when they are on
        build_explanations(layout, prompt_version(explainer_version, inspect.getsource(output))
                           if study.output_variants else explainer_version, explainer_fewshot),
        *optional,
        build_simulations(layout, simulator_version, simulator_fewshot, sources, control),
        build_scores(layout, sources, control, settings.failed_tokens),
        *([build_detection_scores(layout, prompt_version(inspect.getsource(detection), wording), sources)]
          if settings.detection == "on" else []),
        *([build_embedding_scores(layout, digest(embedder_identity()), sources, control)]
          if settings.embedding == "on" else []),
        build_layer_summary(layout, detection=settings.detection == "on", embedding=settings.embedding == "on"),
        build_model_summary(layout),
        build_exported_neurons(layout),
        build_neuron_viewer(layout),
        build_neuron_viewer_index(layout),
    ]
    if code_versions:
        assets = map_asset_specs(
            lambda spec: spec.replace_attributes(code_version=code_versions.get(spec.key.to_user_string(),
                                                                                spec.code_version)), assets)
    sources = [build_subject_model_weights(layout), *build_settings_sources(settings)]
    return Definitions(
        assets=[*sources, *assets],
        executor=executor(settings.executor),
        sensors=[automation_sensor, build_refresh_sensor(assets)],
        schedules=[build_nightly_schedule(tuple(s.key.to_user_string() for s in sources))],
        resources={
            "subject_model": subject_model,
            "corpus": CorpusSource(source=settings.corpus, text_column=settings.text_column),
            "storage": TableStorage(root=settings.storage),
            "study": study,
            "explainer": _llm(settings, "explainer"),
            "simulator": _llm(settings, "simulator"),
            "embedder": Embedder(device=settings.device),
        },
    )


def subject_model_of(settings: Settings) -> SubjectModel:
    return SubjectModel(model=settings.model, cache=settings.cache, device=settings.device,
                        batch_size=settings.batch_size, units=settings.units)


def layout_of(settings: Settings):
    """The layer x shard layout of these settings' units (checks the units folder against the model)."""
    return build_layout(settings.layers, subject_model_of(settings).unit_shape(), settings.shards)


def executor(name: str):
    """None keeps Dagster's default (a process per step for launched runs); 'k8s' makes each step a
    Kubernetes pod, configured by resources/k8s/executor.yaml (the GPU goes to neuron_records only)."""
    if name != "k8s":
        return None
    try:
        from dagster_k8s import k8s_job_executor
    except ImportError:
        raise ValueError("NEURON_ASSETS_EXECUTOR=k8s needs dagster-k8s: pip install 'neuron_assets[k8s]'") from None
    return k8s_job_executor.configured(yaml.safe_load(K8S_EXECUTOR.read_text()), name="k8s_job_executor")


def _api_key(role: str):
    """The key stays in the environment: Dagster resolves the EnvVar at run time and shows only its name."""
    name = api_key_variable(role, os.environ)
    return EnvVar(name) if name else None


def _llm(settings: Settings, role: str) -> LLM:
    backend = getattr(settings, f"{role}_backend")
    return LLM(
        backend=backend, model=getattr(settings, f"{role}_model"),
        base_url=getattr(settings, f"{role}_base_url") or None,
        api_key=_api_key(role) if backend == "openai" else None,
        simulation_method=settings.simulation_method, device=settings.device,
        dtype=getattr(settings, f"{role}_dtype"), cache=settings.cache,
        response_cache=f"{settings.storage}/llm_cache", requests_per_minute=settings.llm_rpm,
        tokens_per_minute=settings.llm_tpm, max_concurrency=settings.llm_concurrency,
        timeout_s=settings.llm_timeout, max_retries=settings.llm_retries, prices=settings.prices,
        model_setting=next(s.env for s in SETTINGS if s.field == f"{role}_model"),
    )


@definitions
def defs() -> Definitions:
    """What `dagster dev`, the daemon and every step process load: the settings in the environment."""
    return build_definitions(Settings.from_env())
