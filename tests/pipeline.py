"""Helpers for asset tests: settings for a tiny model and a small corpus, and whole-graph runs."""

import json
from dataclasses import replace
from pathlib import Path

from neuron_assets.definitions import build_definitions
from neuron_assets.graph import shape_of
from neuron_assets.runs import materialize_runs, shard_keys
from neuron_assets.resources.storage import TableStorage
from neuron_assets.settings import Settings


def write_corpus(path: Path, n_docs: int = 40) -> Path:
    """A .jsonl corpus of real English documentation sections."""
    from neuron_assets.resources.corpus import python_docs

    documents = python_docs()[:n_docs]
    path.write_text("".join(json.dumps({"text": text}) + "\n" for _, text in documents))
    return path


def tiny_settings(model: Path, tmp: Path, **overrides) -> Settings:
    base = Settings(
        model=str(model), corpus=str(write_corpus(tmp / "corpus.jsonl")), text_column="text", max_windows=120,
        seq_len=16, layers="all", shards=2, neurons="first:2", top_records=20, random_records=15, seed=0,
        batch_size=16, device="cpu", explainer_backend="local", explainer_model=str(model), explainer_base_url="",
        simulator_backend="local", simulator_model=str(model), simulator_base_url="", simulation_method="auto",
        llm_rpm=0, llm_tpm=0, llm_concurrency=4, llm_timeout=60, llm_retries=5,
        prices=str(Path(__file__).resolve().parents[1] / "resources" / "prices.json"),
        storage=str(tmp / "data"), cache=str(tmp / "cache"),
        # the extra stages are tested on their own (test_quality.py); off here to keep plumbing tests fast
        revision="off", control="none", detection="off",
    )
    return replace(base, **overrides)


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
