"""End to end: the embedded SmolLM2 model as subject, explainer and simulator; and the dagster CLI."""

import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import polars as pl
from dagster import AssetKey, DagsterInstance
from pipeline import in_memory_instance, run_graph, tiny_settings
from tiny_models import build_tiny_model

from neuron_assets.cli import score_table
from neuron_assets.runs import materialize_runs
from neuron_assets.definitions import build_definitions
from neuron_assets.settings import Settings

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def test_embedded_model_one_layer_one_neuron(tmp_path, monkeypatch):
    for name in [k for k in os.environ if k.startswith("NEURON_ASSETS_")]:
        monkeypatch.delenv(name)
    defaults = Settings.from_env()  # the real defaults: embedded model and corpus
    # the extra stages (revision, controls, detection) have their own tests on tiny models, and run on
    # this model in `make demo`; one neuron keeps this the suite's one run of the real model short
    settings = replace(defaults, storage=str(tmp_path / "data"), max_windows=160, neurons="first:1",
                       revision="off", control="none", detection="off")
    with in_memory_instance() as instance:
        storage = run_graph(settings, instance, ("00",), shards=["0000-0191"])
    tokens = storage.read("corpus_tokens")
    assert tokens.height == 160 and len(tokens["tokens"][0]) == 64
    records = storage.read("neuron_records", "00", "records")
    assert records["unit"].n_unique() == 1536  # every MLP neuron of SmolLM2's layer 0
    scores = storage.read("scores", "00|0000-0191")
    assert scores["unit"].unique().to_list() == [0]
    assert set(scores["variant"]) == {"llm", "token_baseline"}
    explained = storage.read("explanations", "00|0000-0191").filter(pl.col("error").is_null())
    assert explained.height >= 1 and explained["text"].str.len_chars().min() > 0
    finite = scores["score_all"].to_numpy()
    finite = finite[np.isfinite(finite)]
    assert finite.size >= 1 and np.all(np.abs(finite) <= 1)
    embedded = storage.read("embedding_scores", "00|0000-0191")
    assert embedded.filter(pl.col("error").is_null()).height == explained.height
    summary = storage.read("model_summary")
    assert summary["layer"].to_list() == [0, 0] and set(summary["method"]) == {"all_at_once"}
    table = score_table(settings.storage).splitlines()
    assert len(table) == 3 and "token_baseline" in table[2] and "all_at_once" in table[1]


def test_dagster_cli_materializes_one_layer(tmp_path):
    model = build_tiny_model("gpt2", tmp_path / "model", n_layers=3, max_positions=4096)
    settings = tiny_settings(model, tmp_path)
    home = tmp_path / "home"
    home.mkdir()
    (home / "dagster.yaml").write_text((REPO / "resources" / "dagster.yaml").read_text())
    env = {**os.environ, "DAGSTER_HOME": str(home), "NEURON_ASSETS_MODEL": settings.model,
           "NEURON_ASSETS_CORPUS": settings.corpus, "NEURON_ASSETS_STORAGE": settings.storage,
           "NEURON_ASSETS_CACHE": settings.cache, "NEURON_ASSETS_SEQ_LEN": "16", "NEURON_ASSETS_MAX_WINDOWS": "60",
           "NEURON_ASSETS_DEVICE": "cpu"}

    def dagster(*args):
        done = subprocess.run([str(BIN / "dagster"), "asset", "materialize", "-m", "neuron_assets.definitions", *args],
                              env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    with DagsterInstance.from_config(str(home)) as instance:  # the corpus in-process: one CLI start less
        materialize_runs(build_definitions(replace(settings, max_windows=60)), instance,
                         [(("corpus_documents", "corpus_tokens"), None)], log=lambda _: None)
    dagster("--select", "neuron_records", "--partition", "01")
    data = Path(settings.storage) / "neuron_records"
    assert sorted(p.name for p in data.iterdir()) == ["01"]
    assert (data / "01" / "records.parquet").is_file() and (data / "01" / "stats.parquet").is_file()
    with DagsterInstance.from_config(str(home)) as instance:
        records = instance.fetch_materializations(AssetKey("neuron_records"), limit=10).records
        assert [r.partition_key for r in records] == ["01"]


def test_settings_command_lists_every_variable():
    done = subprocess.run([str(BIN / "neuron-assets"), "settings"], capture_output=True, text=True, check=True)
    from neuron_assets.settings import SETTINGS

    for setting in SETTINGS:
        assert setting.env in done.stdout
    readme = (REPO / "README.md").read_text()
    table = subprocess.run([str(BIN / "neuron-assets"), "settings", "--markdown"], capture_output=True, text=True,
                           check=True).stdout.strip()
    assert table.count("\n") == len(SETTINGS) + 1 and table in readme, "README's settings table is out of date: " \
        "paste `neuron-assets settings --markdown`"
