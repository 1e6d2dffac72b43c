"""Helpers for asset tests: settings for a tiny model and a small corpus, and whole-graph runs."""

import json
from dataclasses import replace
from pathlib import Path

from dagster import DagsterInstance

from neuron_assets.definitions import build_definitions
from neuron_assets.graph import shape_of
from neuron_assets.runs import materialize_runs, shard_keys
from neuron_assets.resources.storage import TableStorage
from neuron_assets.settings import SETTINGS, Settings


def write_corpus(path: Path, n_docs: int = 40) -> Path:
    """A .jsonl corpus of real English documentation sections."""
    from neuron_assets.resources.corpus import python_docs

    documents = python_docs()[:n_docs]
    path.write_text("".join(json.dumps({"text": text}) + "\n" for _, text in documents))
    return path


def tiny_settings(model: Path, tmp: Path, **overrides) -> Settings:
    """Settings for a tiny model on a small corpus, parsed from the declaration like the
    environment's; `overrides` by field name (seq_len=16)."""
    values = dict(
        model=model, corpus=write_corpus(tmp / "corpus.jsonl"), max_windows=120, seq_len=16, shards=2,
        neurons="first:2", top_records=20, random_records=15, device="cpu", explainer_model=model,
        simulator_model=model, storage=tmp / "data", cache=tmp / "cache",
        # the extra stages are tested on their own (test_quality.py); off here to keep plumbing tests fast
        revision="off", control="none", detection="off", embedding="off",
    )
    values.update(overrides)
    env = {s.env: str(values[s.field]) for s in SETTINGS if s.field in values}
    return Settings.from_env(env)


def remote(settings: Settings, server) -> Settings:
    """The same settings with explainer and simulator behind an OpenAI-compatible test server."""
    return replace(settings, explainer_backend="openai", explainer_model="gpt-4o-mini",
                   explainer_base_url=server.base_url, simulator_backend="openai", simulator_model="gpt-4o-mini",
                   simulator_base_url=server.base_url, llm_retries=1, llm_timeout=30)


def demo_runs(settings: Settings, layers: tuple[str, ...], shards: list[str]) -> list:
    """The demo's runs for these settings' graph: observe the sources, then stage by stage."""
    return shape_of(build_definitions(settings)).demo_runs(layers, shards)


def run_graph(settings: Settings, instance, layers: tuple[str, ...], shards: list[str] | None = None) -> TableStorage:
    defs = build_definitions(settings)
    shards = shards or shard_keys(defs)
    materialize_runs(defs, instance, shape_of(defs).demo_runs(layers, shards), log=lambda _: None)
    return TableStorage(root=settings.storage)


def in_memory_instance() -> DagsterInstance:
    """A Dagster instance held in memory: the same storage code as a DAGSTER_HOME's SQLite files,
    without opening a file per query (about 40% of a run's overhead). For tests whose runs stay in
    this process; persistence, step processes and the UI are tested on real homes."""
    return DagsterInstance.ephemeral()
