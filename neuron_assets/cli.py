"""`neuron-assets`: the demo, the settings in force, and a per-layer score table."""

import argparse
import os
import sys
import time
import warnings
from pathlib import Path

from neuron_assets.audit import add_audit_parser
from neuron_assets.settings import SETTINGS, Settings

DEMO_LAYERS = ("00", "01", "02")
# Dagster's own step events are DEBUG; INFO keeps the run logs' progress lines on the console.
QUIET = {"loggers": {"console": {"config": {"log_level": "INFO"}}}}


def _instance():
    from dagster import DagsterInstance

    home = Path(os.environ.setdefault("DAGSTER_HOME", str(Path(".dagster_home").resolve())))
    home.mkdir(parents=True, exist_ok=True)
    config = home / "dagster.yaml"
    if not config.exists():
        config.write_text((Path(__file__).resolve().parents[1] / "resources" / "dagster.yaml").read_text())
    return DagsterInstance.get()


def materialize_runs(defs, instance, runs, log=print) -> None:
    """Materialize (selection, partition or (start, end) range) runs one after another, in-process.

    One process keeps the models loaded across runs; each run is recorded in the instance, so
    it shows in the Dagster UI exactly as a run launched there.
    """
    from dagster import AssetKey

    from neuron_assets.partitions import run_target

    job = defs.resolve_implicit_global_asset_job_def()
    started = time.monotonic()
    for i, (selection, partition) in enumerate(runs, 1):
        key, tags = run_target(partition)
        where = f" [{partition[0]}..{partition[1]}]" if isinstance(partition, tuple) else (f" [{key}]" if key else "")
        log(f"[{i}/{len(runs)}] {time.monotonic() - started:6.0f}s  {', '.join(selection)}{where}")
        result = job.execute_in_process(
            instance=instance, partition_key=key, tags=tags, run_config=QUIET,
            asset_selection=[AssetKey(name) for name in selection], raise_on_error=False,
        )
        if not result.success:
            failure = next((e for e in result.all_events if e.is_step_failure), None)
            raise SystemExit(f"run {result.run_id} failed: {_root_cause(failure)}")


def _root_cause(failure) -> str:
    """The user's error (e.g. a bad setting), not Dagster's wrapper around it."""
    if failure is None:
        return "see the run log"
    error = failure.step_failure_data.error
    while error.cause is not None:
        error = error.cause
    return error.message.strip()


def shard_keys(defs) -> list[str]:
    return defs.resolve_assets_def("scores").partitions_def.get_partitions_def_for_dimension("shard").get_partition_keys()


def demo_runs(layers: tuple[str, ...], shards: list[str]) -> list:
    # Observing the weights first lets Dagster notice when a later checkpoint changes a layer.
    runs = [(("subject_model_weights",), None), (("corpus_documents", "corpus_tokens"), None),
            (("neuron_records",), (layers[0], layers[-1]))]
    runs += [(("explanations", "simulations", "scores"), f"{layer}|{shard}") for layer in layers for shard in shards]
    runs += [(("layer_summary",), layer) for layer in layers]
    runs += [(("model_summary",), None)]
    return runs


def score_table(storage_root: str) -> str:
    from neuron_assets.resources.storage import TableStorage

    summary = TableStorage(root=storage_root).read("model_summary")
    lines = [f"{'layer':>5}  {'variant':<15}{'method':<14}{'neurons':>8}{'scored':>8}{'mean':>8}{'median':>8}"
             f"{'top':>8}{'random':>8}{'>=0.8':>7}{'cost $':>9}"]

    def f(x):
        return "     nan" if x is None or x != x else f"{x:8.3f}"

    for r in summary.iter_rows(named=True):
        lines.append(f"{r['layer']:>5}  {r['variant']:<15}{r['method']:<14}{r['neurons']:>8}{r['scored']:>8}"
                     f"{f(r['mean_score_all'])}{f(r['median_score_all'])}{f(r['mean_score_top'])}"
                     f"{f(r['mean_score_random'])}{100 * (r['share_at_least_0.8'] or 0):6.0f}%{r['cost_usd']:9.4f}")
    return "\n".join(lines)


def demo(args) -> None:
    settings = Settings.from_env()
    print(f"neuron_assets demo: subject, explainer and simulator = {settings.model}, corpus = {settings.corpus}; "
          f"layers {', '.join(args.layers)}, the first {args.shards} of {settings.shards} shards per layer, "
          f"neurons per shard = {settings.neurons}")
    print("loading definitions (the first run converts the embedded GGUF model once, ~30 s)...")
    from neuron_assets.definitions import build_definitions

    defs = build_definitions(settings)
    instance = _instance()
    shards = shard_keys(defs)[: args.shards]
    started = time.monotonic()
    materialize_runs(defs, instance, demo_runs(tuple(args.layers), shards))
    print(f"\ndone in {time.monotonic() - started:.0f} s. Scores (score_all = top-and-random correlation):\n")
    print(score_table(settings.storage))
    print(f"\nTables:        {settings.storage}/<asset>/<partition>/*.parquet")
    print(f"Dagster home:  {os.environ['DAGSTER_HOME']}")
    print("Open the UI:   make ui   then http://127.0.0.1:3000 (Assets > neuron_records, scores, ...)")


def show_settings(args) -> None:
    current = Settings.from_env()
    for setting in SETTINGS:
        value = os.environ.get(setting.env) or setting.default
        if setting.env.endswith("_API_KEY"):  # never print a secret
            value = "(set)" if value else "(unset)"
        print(f"{setting.env}={value}\n    {setting.help}")
    print(f"\nresolved storage root: {current.storage}")


def scores(args) -> None:
    print(score_table(Settings.from_env().storage))


def refresh(args) -> None:
    from neuron_assets.refresh import main_refresh

    args.stale_only = not args.missing
    main_refresh(args)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="neuron-assets", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="materialize the whole graph for a small slice and print the scores")
    p.add_argument("--layers", nargs="+", default=list(DEMO_LAYERS), help="layer keys (default: 00 01 02)")
    p.add_argument("--shards", type=int, default=1, help="shards per layer, from the first (default: 1)")
    p.set_defaults(run=demo)
    sub.add_parser("settings", help="the environment variables in force").set_defaults(run=show_settings)
    sub.add_parser("scores", help="the per-layer score table of model_summary").set_defaults(run=scores)
    p = sub.add_parser("refresh", help="observe the weights, then materialize only the stale partitions")
    p.add_argument("--dry-run", action="store_true", help="list what would run, launch nothing")
    p.add_argument("--missing", action="store_true",
                   help="also fill missing partitions whose inputs exist (default: stale ones only)")
    p.add_argument("--no-observe", action="store_true", help="do not observe the weights first")
    p.set_defaults(run=refresh)
    add_audit_parser(sub)
    args = parser.parse_args(argv)
    # Dagster marks MultiToSingleDimensionPartitionMapping as beta at every use; the README says so once.
    from dagster import BetaWarning

    warnings.filterwarnings("ignore", category=BetaWarning)
    try:
        args.run(args)
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"neuron-assets: {e}")


if __name__ == "__main__":
    main()
