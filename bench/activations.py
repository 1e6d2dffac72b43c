"""Activation capture benchmarks (issue 5, targets 1-3), on the embedded model and corpus.

1. `neuron_records` vs the bare model: tokens/s of the asset's step (forward with hooks, top-k,
   reservoirs, stats, Parquet writes), all layers in one run, over tokens/s of the base model's
   plain forward pass (no hooks, no LM head) on the same batches, timed before and after it.
2. One pass for all layers: one single-run backfill of every layer vs one run per layer.
3. Memory: peak RSS of a process materializing `neuron_records` for the corpus and for the
   corpus repeated 10 times.

    .venv/bin/python bench/activations.py            # about 15 minutes on 2 cores
    .venv/bin/python bench/activations.py --only 1 --windows 1658

Every run goes through Dagster (a temporary on-disk instance and storage root), as `make demo`.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def configure(root: Path, windows: int, corpus: str = "python-docs", layers: str = "all") -> None:
    """Point the settings at a fresh storage root and instance under `root`."""
    os.environ.update({
        "NEURON_ASSETS_STORAGE": str(root / "data"), "NEURON_ASSETS_MAX_WINDOWS": str(windows),
        "NEURON_ASSETS_CORPUS": corpus, "NEURON_ASSETS_LAYERS": layers, "DAGSTER_HOME": str(root / "home"),
    })


def open_graph(root: Path):
    from dagster import DagsterInstance

    from neuron_assets.definitions import build_definitions
    from neuron_assets.settings import Settings

    (root / "home").mkdir(parents=True, exist_ok=True)
    (root / "home" / "dagster.yaml").write_text((REPO / "resources" / "dagster.yaml").read_text())
    settings = Settings.from_env()
    return settings, build_definitions(settings), DagsterInstance.get()


def run(defs, instance, selection: tuple[str, ...], partition=None) -> tuple[float, str]:
    """(wall seconds, run id) of one in-process run, as `neuron-assets demo` launches them."""
    from neuron_assets.runs import materialize_runs

    start = time.perf_counter()
    materialize_runs(defs, instance, [(selection, partition)], log=lambda _: None)
    return time.perf_counter() - start, instance.get_runs(limit=1)[0].run_id


def step_seconds(instance, run_id: str, step: str) -> float:
    """STEP_START to STEP_SUCCESS of one step: the asset's own work, without run start and end."""
    from dagster import DagsterEventType

    times = {}
    for entry in instance.all_logs(run_id, of_type={DagsterEventType.STEP_START, DagsterEventType.STEP_SUCCESS}):
        if entry.step_key == step:
            times[entry.dagster_event.event_type] = entry.timestamp
    return times[DagsterEventType.STEP_SUCCESS] - times[DagsterEventType.STEP_START]


def bare_forward_seconds(settings, token_ids) -> float:
    """The base model (no LM head, no hooks) over the same batches as `neuron_records`."""
    import torch

    from neuron_assets.resources.models import load_causal_lm

    model, _ = load_causal_lm(settings.model, settings.cache, settings.device)
    base = model.base_model
    start = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(token_ids), settings.batch_size):
            base(input_ids=torch.tensor(token_ids[i : i + settings.batch_size], device=model.device), use_cache=False)
    return time.perf_counter() - start


def corpus_token_ids(settings):
    from neuron_assets.resources.storage import TableStorage

    column = TableStorage(root=settings.storage).read("corpus_tokens", columns=["token_ids"])["token_ids"]
    return column.list.to_array(settings.seq_len).to_numpy()


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def capture_vs_bare(root: Path, windows: int) -> None:
    configure(root, windows)
    settings, defs, instance = open_graph(root)
    run(defs, instance, ("corpus_documents", "corpus_tokens"))
    token_ids = corpus_token_ids(settings)
    n_layers = len(defs.resolve_assets_def("neuron_records").partitions_def.get_partition_keys())
    tokens = token_ids.size
    print(f"  {len(token_ids)} windows, {tokens} tokens, {n_layers} layers, batch {settings.batch_size}", flush=True)
    bare_before = bare_forward_seconds(settings, token_ids)
    print(f"  bare forward: {bare_before:.1f} s", flush=True)
    keys = defs.resolve_assets_def("neuron_records").partitions_def.get_partition_keys()
    wall, run_id = run(defs, instance, ("neuron_records",), (keys[0], keys[-1]))
    step = step_seconds(instance, run_id, "neuron_records")
    print(f"  neuron_records step: {step:.1f} s (run {wall:.1f} s)", flush=True)
    bare_after = bare_forward_seconds(settings, token_ids)
    print(f"  bare forward again: {bare_after:.1f} s", flush=True)
    bare = (bare_before + bare_after) / 2
    ratio = (tokens / step) / (tokens / bare)
    print(f"target 1: neuron_records {tokens / step:,.0f} tokens/s vs bare forward {tokens / bare:,.0f} tokens/s "
          f"(mean of {bare_before:.1f} s and {bare_after:.1f} s): ratio {ratio:.3f} (target >= 0.95) {verdict(ratio >= 0.95)}")


def one_pass_vs_per_layer(root: Path, windows: int) -> None:
    configure(root, windows)
    _, defs, instance = open_graph(root)
    run(defs, instance, ("corpus_documents", "corpus_tokens"))
    keys = defs.resolve_assets_def("neuron_records").partitions_def.get_partition_keys()
    single, _ = run(defs, instance, ("neuron_records",), (keys[0], keys[-1]))
    print(f"  one run, {len(keys)} layers: {single:.1f} s", flush=True)
    per_layer = 0.0
    for key in keys:
        seconds, _ = run(defs, instance, ("neuron_records",), key)
        per_layer += seconds
    print(f"  one run per layer: {per_layer:.1f} s in {len(keys)} runs", flush=True)
    print(f"target 2: {len(keys)} layers, {windows} windows: one single-run backfill {single:.1f} s vs one run per "
          f"layer {per_layer:.1f} s: {per_layer / single:.1f}x (expected well above 10x) {verdict(per_layer / single > 10)}")


def write_repeated_corpus(path: Path, times: int) -> str:
    from neuron_assets.resources.corpus import python_docs

    documents = python_docs()
    path.write_text("".join(json.dumps({"text": text}) + "\n" for _ in range(times) for _, text in documents))
    return str(path)


def peak_rss(root: Path, corpus: str, layers: str) -> dict:
    """Materialize the corpus here, then neuron_records in a fresh process; its peak RSS."""
    configure(root, 0, corpus, layers)
    _, defs, instance = open_graph(root)
    run(defs, instance, ("corpus_documents", "corpus_tokens"))
    out = subprocess.run([sys.executable, __file__, "--capture-child"], env=os.environ.copy(),
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def peak_rss_mb() -> float:
    status = Path("/proc/self/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("VmHWM:")).split()[1]) / 1024


def capture_child() -> None:
    """Load the model, reset the peak RSS (Linux: clear_refs 5), run `neuron_records`: the peak
    then is the capture's, not the one-off spike of loading the checkpoint."""
    from neuron_assets.resources.models import load_causal_lm

    settings, defs, instance = open_graph(Path(os.environ["DAGSTER_HOME"]).parent)
    load_causal_lm(settings.model, settings.cache, settings.device)
    after_load = peak_rss_mb()
    Path("/proc/self/clear_refs").write_text("5")
    keys = defs.resolve_assets_def("neuron_records").partitions_def.get_partition_keys()
    seconds, _ = run(defs, instance, ("neuron_records",), (keys[0], keys[-1]))
    windows = len(corpus_token_ids(settings))
    print(json.dumps({"peak_rss_mb": peak_rss_mb(), "peak_with_load_mb": after_load,
                      "windows": windows, "seconds": seconds}))


def memory(root: Path, layers: str, times: int) -> None:
    one = peak_rss(root / "x1", "python-docs", layers)
    print(f"  loading the model peaks at {one['peak_with_load_mb']:.0f} MB RSS (once per process, before capture)")
    print(f"  corpus x1: {one['windows']} windows, {one['seconds']:.0f} s, peak RSS {one['peak_rss_mb']:.0f} MB", flush=True)
    corpus = write_repeated_corpus(root / f"corpus_x{times}.jsonl", times)
    many = peak_rss(root / f"x{times}", corpus, layers)
    print(f"  corpus x{times}: {many['windows']} windows, {many['seconds']:.0f} s, peak RSS {many['peak_rss_mb']:.0f} MB",
          flush=True)
    ratio = many["peak_rss_mb"] / one["peak_rss_mb"]
    print(f"target 3: layers {layers}: peak RSS of the capture at {many['windows'] / one['windows']:.1f}x the corpus: "
          f"{ratio:.3f}x (target <= 1.2x) {verdict(ratio <= 1.2)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", type=int, choices=(1, 2, 3), help="run one target")
    parser.add_argument("--windows", type=int, default=512, help="target 1: windows of the corpus (0 = all 1,658)")
    parser.add_argument("--per-layer-windows", type=int, default=128, help="target 2: windows of the corpus")
    parser.add_argument("--memory-layers", default="0-1", help="target 3: layers captured")
    parser.add_argument("--memory-times", type=int, default=10, help="target 3: corpus repeats")
    parser.add_argument("--capture-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    warnings.filterwarnings("ignore", message=".*is currently in beta")
    if args.capture_child:
        return capture_child()

    import torch

    print(f"activation capture: embedded model, {os.cpu_count()} CPUs, torch {torch.__version__} "
          f"with {torch.get_num_threads()} threads, CUDA {'yes' if torch.cuda.is_available() else 'no'}")
    with tempfile.TemporaryDirectory(prefix="bench-activations-") as tmp:
        root = Path(tmp)
        if args.only in (None, 1):
            capture_vs_bare(root / "t1", args.windows)
        if args.only in (None, 2):
            one_pass_vs_per_layer(root / "t2", args.per_layer_windows)
        if args.only in (None, 3):
            memory(root / "t3", args.memory_layers, args.memory_times)


if __name__ == "__main__":
    main()
