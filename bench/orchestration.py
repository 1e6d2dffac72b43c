"""Orchestration overhead of the demo (issue 5, target 6).

Runs `neuron-assets demo` exactly as `make demo` does (first 3 neurons of the first shard of
layers 00-02), in a fresh process, instance and storage root, and splits its wall time into:
- model compute: the `model seconds` the assets record (subject-model forward passes,
  explainer generation, simulator passes), summed over every materialization;
- the rest of the steps: reading and writing Parquet, record sampling, scoring, metadata;
- outside the steps: process start and imports, Dagster run start and end, model loading.

    .venv/bin/python bench/orchestration.py      # about 6 minutes on 2 cores
"""

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TIMED_ASSETS = ("neuron_records", "explanations", "simulations")


def model_seconds(instance) -> dict[str, float]:
    from dagster import AssetKey

    from neuron_assets.assets.common import MODEL_SECONDS

    totals = {}
    for name in TIMED_ASSETS:
        # a run over several partitions records its metadata on each: count it once per run
        per_run = {}
        for r in instance.fetch_materializations(AssetKey(name), limit=10_000).records:
            if MODEL_SECONDS in r.asset_materialization.metadata:
                per_run[r.run_id] = r.asset_materialization.metadata[MODEL_SECONDS].value
        totals[name] = sum(per_run.values())
    return totals


def step_seconds(instance) -> tuple[float, int]:
    """Sum of STEP_START to STEP_SUCCESS over every run, and the number of runs."""
    from dagster import DagsterEventType

    kinds = {DagsterEventType.STEP_START, DagsterEventType.STEP_SUCCESS}
    total, runs = 0.0, instance.get_runs()
    for run in runs:
        started = {}
        for entry in instance.all_logs(run.run_id, of_type=kinds):
            if entry.dagster_event.event_type == DagsterEventType.STEP_START:
                started[entry.step_key] = entry.timestamp
            else:
                total += entry.timestamp - started.pop(entry.step_key)
    return total, len(runs)


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="bench-orchestration-") as tmp:
        home = Path(tmp) / "home"
        env = {**os.environ, "DAGSTER_HOME": str(home), "NEURON_ASSETS_STORAGE": str(Path(tmp) / "data"),
               "NEURON_ASSETS_NEURONS": os.environ.get("NEURON_ASSETS_NEURONS", "first:3")}
        command = [str(Path(sys.executable).parent / "neuron-assets"), "demo"]
        print(f"running {' '.join(command)} with NEURON_ASSETS_NEURONS={env['NEURON_ASSETS_NEURONS']} ...", flush=True)
        start = time.perf_counter()
        subprocess.run(command, env=env, cwd=REPO, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wall = time.perf_counter() - start

        os.environ["DAGSTER_HOME"] = str(home)
        from dagster import DagsterInstance

        instance = DagsterInstance.get()
        model = model_seconds(instance)
        steps, runs = step_seconds(instance)

    compute = sum(model.values())
    print(f"demo wall time {wall:.1f} s in {runs} Dagster runs")
    for name, seconds in model.items():
        print(f"  model compute in {name:15s} {seconds:7.1f} s")
    print(f"  model compute, total         {compute:7.1f} s ({100 * compute / wall:.1f}%)")
    print(f"  rest of the steps (I/O, sampling, scoring, metadata) {steps - compute:7.1f} s "
          f"({100 * (steps - compute) / wall:.1f}%)")
    print(f"  outside the steps (process start, imports, run start/end, model loading) {wall - steps:7.1f} s "
          f"({100 * (wall - steps) / wall:.1f}%)")
    share = (wall - compute) / wall
    print(f"target 6: share of the demo's wall time outside model compute: {100 * share:.1f}% (target < 25%) "
          f"{'PASS' if share < 0.25 else 'MISS'}")


if __name__ == "__main__":
    main()
