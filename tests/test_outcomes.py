"""What `neuron-assets demo` leaves and says, through the real CLI on a tiny model with every default
feature on: a narrower neuron selection replaces no result, and a run where every unit failed says
so and exits non-zero."""

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
from pipeline import write_corpus
from services import free_port
from tiny_models import build_tiny_model

REPO = Path(__file__).resolve().parents[1]
TABLES = ("explanations", "revised_explanations", "simulations", "scores", "detection_scores")


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return build_tiny_model("llama", tmp_path_factory.mktemp("model") / "llama", n_layers=1, max_positions=4096)


def cli(tmp: Path, model: Path, *command: str, **settings) -> subprocess.CompletedProcess:
    values = dict(MODEL=model, EXPLAINER_MODEL=model, SIMULATOR_MODEL=model, CORPUS=tmp / "corpus.jsonl",
                  STORAGE=tmp / "data", CACHE=tmp / "cache", MAX_WINDOWS=60, SEQ_LEN=16, SHARDS=1, NEURONS="first:2",
                  TOP_RECORDS=20, RANDOM_RECORDS=15, DEVICE="cpu", WORKERS=1) | settings
    environ = {**os.environ, "PYTHONPATH": str(REPO), "DAGSTER_HOME": str(tmp / "dagster_home"),
               **{f"NEURON_ASSETS_{k}": str(v) for k, v in values.items()}}
    if not (tmp / "corpus.jsonl").exists():
        write_corpus(tmp / "corpus.jsonl")
    return subprocess.run([sys.executable, "-m", "neuron_assets.cli", *command], env=environ,
                          capture_output=True, text=True, timeout=600)


def demo(tmp: Path, model: Path, **settings) -> subprocess.CompletedProcess:
    return cli(tmp, model, "demo", "--layers", "00", **settings)


def stored(tmp: Path) -> dict[str, str]:
    """sha256 of every stored file of the shard-level tables."""
    return {str(p.relative_to(tmp)): hashlib.sha256(p.read_bytes()).hexdigest()
            for table in TABLES for p in sorted((tmp / "data" / table).rglob("*.parquet"))}


def test_a_narrower_selection_keeps_every_result(model, tmp_path):
    first = demo(tmp_path, model)
    assert first.returncode == 0, first.stderr[-3000:]
    before = stored(tmp_path)
    assert len(before) == len(TABLES)
    narrower = cli(tmp_path, model, "refresh", NEURONS="first:1")
    assert narrower.returncode == 0, narrower.stderr[-3000:]
    # the shard's run reran (the selection changed); neuron 1 is outside it now, and its results are
    # still valid: every table is as it was
    assert "stale: explanations[00|" in narrower.stdout and "1 run(s)" in narrower.stdout
    assert stored(tmp_path) == before


def test_every_unit_failing_is_reported_and_exits_non_zero(model, tmp_path):
    closed = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there
    done = demo(tmp_path, model, EXPLAINER_BACKEND="openai", EXPLAINER_MODEL="gpt-4o-mini",
                EXPLAINER_BASE_URL=closed, SIMULATOR_BACKEND="openai", SIMULATOR_MODEL="gpt-4o-mini",
                SIMULATOR_BASE_URL=closed, LLM_RETRIES=0, LLM_TIMEOUT=5, NEURONS="first:1")
    assert done.returncode == 1, done.stdout[-2000:] + done.stderr[-2000:]
    err = done.stderr
    assert "simulations: " in err and "rows are errors" in err and "simulator unusable" in err
    assert "every unit failed in" in err and "simulations[00|" in err
    assert "Traceback" not in err and "Stack Trace" not in err
    # the quality report still printed, with the errors beside the scores
    assert "errors" in done.stdout.splitlines()[next(i for i, line in enumerate(done.stdout.splitlines())
                                                     if line.split()[:2] == ["layer", "variant"])]
