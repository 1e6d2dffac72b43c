"""`neuron-assets`: the demo, the settings in force, and a per-layer score table."""

import argparse
import os
import sys
import time
import warnings
from contextlib import contextmanager

# The commands import what they run (the definitions, models, torch) inside their functions, so
# `neuron-assets settings` and `--help` answer at once; no import there hides a cycle.
from neuron_assets.audit import add_audit_parser
from neuron_assets.graph import shape_of
from neuron_assets.instance import InstanceError, open_instance
from neuron_assets.outcome import describe, error_rows
from neuron_assets.resources.files import StorageError, check_s3_root
from neuron_assets.resources.storage import TableStorage
from neuron_assets.runs import layer_keys, materialize_runs, shard_keys
from neuron_assets.settings import MLP_UNITS, SECRETS, SETTINGS, Settings, SettingsError, effect, markdown_table, secret_shown
from neuron_assets.versions import source_versions

N_DEMO_LAYERS = 2  # the demo's layers by default: the first two in force
# (column of the quality report, header, width); a column missing from the summary is not printed
REPORT = (("errors", "errors", 7), ("mean_score_all", "mean", 7), ("share_at_least_0.8", ">=0.8", 6), ("control_mean_score_all", "control", 8),
          ("margin_over_control", "margin", 7), ("gain_over_llm", "gain", 7),
          ("mean_detection_random", "det.rnd", 8), ("mean_detection_hard_negative", "det.hard", 9),
          ("mean_fuzzing_random", "fuz.rnd", 8), ("mean_fuzzing_hard_negative", "fuz.hard", 9),
          ("mean_embedding_auroc", "emb", 7), ("control_mean_embedding_auroc", "emb.ctl", 8))


def score_table(storage_root: str) -> str:
    """The quality report of model_summary as text: one line per layer x variant (x simulation
    method); NaN where nothing could be computed, '-' where the column does not apply."""
    from neuron_assets.stages.score import quality_report

    report = quality_report(TableStorage(root=storage_root).read("model_summary"))
    columns = [c for c in REPORT if c[0] in report.columns]
    lines = [f"{'layer':>5}  {'variant':<16}{'method':<14}{'units':>8}"
             + "".join(f"{header:>{width}}" for _, header, width in columns) + f"{'cost $':>10}"]

    def cell(value, width):
        if value is None:
            return f"{'-':>{width}}"
        if isinstance(value, int):
            return f"{value:>{width}}"
        return f"{'nan':>{width}}" if value != value else f"{value:{width}.3f}"

    for r in report.iter_rows(named=True):
        lines.append(f"{r['layer']:>5}  {r['variant']:<16}{r['method']:<14}{r['units']:>8}"
                     + "".join(cell(r[name], width) for name, _, width in columns) + f"{r['cost_usd']:10.4f}")
    return "\n".join(lines)


def demo(args) -> None:
    settings = Settings.from_env()
    print(f"neuron_assets demo: subject, explainer and simulator = {settings.model}, corpus = {settings.corpus}; "
          f"layers {' '.join(args.layers) if args.layers else f'the first {N_DEMO_LAYERS} in force'}, the first "
          f"{args.shards} of {settings.shards} shards per layer, units per shard = {settings.neurons}")
    check_s3_root(settings.storage)  # an unusable s3:// root fails here, before any run
    source_versions(settings)  # so does a setting that cannot be versioned (a missing import folder)
    print("loading definitions (the first run converts the embedded GGUF model once, ~30 s)...")
    from neuron_assets.assets.common import viewer_page
    from neuron_assets.definitions import build_definitions
    from neuron_assets.progress import with_progress_bar

    # Progress lines as a progress bar on a terminal (runs in this process); plain lines otherwise.
    defs = with_progress_bar(build_definitions(settings), tracebacks=args.verbose)
    instance = open_instance()
    shards = shard_keys(defs)[: args.shards]
    layers = demo_layers(args.layers, layer_keys(defs))
    print(f"layers {', '.join(layers)}; shards {', '.join(shards)}")
    runs = shape_of(defs).demo_runs(tuple(layers), shards)
    started = time.monotonic()
    with reporting_errors(settings.storage, runs):
        materialize_runs(defs, instance, runs, workers=settings.workers)
    print(f"\ndone in {time.monotonic() - started:.0f} s. Scores (score_all = top-and-random correlation):\n")
    print(score_table(settings.storage))
    print(f"\nNeuron viewer: {viewer_page(settings.storage)}")
    print(f"Tables:        {settings.storage}/<asset>/<partition>/*.parquet")
    print(f"Dagster home:  {os.environ['DAGSTER_HOME']}")
    print("Open the UI:   make ui   then http://127.0.0.1:3000 (Assets > neuron_records, scores, ...)")
    exit_if_all_failed(settings.storage, runs)


@contextmanager
def reporting_errors(storage_root: str, runs):
    """Where runs stop on a failed run, print the error rows written so far before the failure."""
    try:
        yield
    except SystemExit:
        print("\n".join(describe(error_rows(TableStorage(root=storage_root), runs))), file=sys.stderr)
        raise


def demo_layers(asked: list[str] | None, keys: list[str]) -> list[str]:
    """The layers the demo runs: those asked for (`chosen_layers`), else the first two in force."""
    return chosen_layers(asked, keys) if asked else keys[:N_DEMO_LAYERS]


def chosen_layers(asked: list[str], keys: list[str]) -> list[str]:
    """The layer keys `asked` names (`--layers`: layer keys or numbers) among the `keys` in force; a
    SettingsError names what is not one of them."""
    by_number = {int(k): k for k in keys}
    try:
        chosen = [by_number.get(int(a), a) for a in asked]
    except ValueError:
        raise SettingsError(f"--layers takes layer numbers or keys such as {keys[0]}, got {' '.join(asked)}") from None
    unknown = [a for a in chosen if a not in keys]
    if unknown:
        raise SettingsError(f"--layers {' '.join(unknown)}: not among the layers in force ({', '.join(keys)}; "
                            "NEURON_ASSETS_LAYERS and NEURON_ASSETS_UNITS choose them)")
    return chosen


def exit_if_all_failed(storage_root: str, runs) -> None:
    """Print the error rows the runs wrote, per asset; exit 1 where a partition has nothing but errors
    (an endpoint that never answered, a model that cannot simulate): a script must be able to tell."""
    entries = error_rows(TableStorage(root=storage_root), runs)
    lines = describe(entries)
    if lines:
        print("\nerror rows:\n" + "\n".join(lines), file=sys.stderr)
    if any(e.all_failed for e in entries):
        sys.exit("neuron-assets: every unit failed in some partitions (above); the rows say why")


def show_settings(args) -> None:
    if args.markdown:
        print(markdown_table())
        return
    for setting in SETTINGS:
        value = os.environ.get(setting.env) or setting.default
        if setting.env.endswith(SECRETS):  # never print a secret
            value = secret_shown(setting, os.environ)
        print(f"{setting.env}={value}\n    {setting.help}\n    a change: {effect(setting)}")
    current = Settings.from_env()  # bad values are shown above, then named after them (exit status 2)
    print(f"\nresolved storage root: {current.storage}")
    try:  # the settings are shown even where one cannot be versioned; that error follows them
        versions = source_versions(current)
    except ValueError as e:
        sys.exit(f"neuron-assets: {e}")
    print("settings source versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    if current.units != MLP_UNITS:  # the coders, checked against the model as the definitions check them
        from neuron_assets.definitions import layout_of, subject_model_of

        try:
            layout = layout_of(current)
        except ValueError as e:
            sys.exit(f"neuron-assets: {e}")
        coders = subject_model_of(current).coders()
        print(f"units: {layout.n_units} latents per layer, in layers "
              + "; ".join(f"{layout.layer_key(i)}: {coders[i].describe()}" for i in layout.layers))


def scores(args) -> None:
    print(score_table(Settings.from_env().storage))


def explore(args) -> None:
    """Run the subject model on a text and print, per token, the most active explained neurons of
    each layer that has scores (neuron_assets/explorer.py)."""
    settings = Settings.from_env()  # before the imports below (torch: seconds): bad settings fail at once
    from neuron_assets.explorer import format_hits, load_explained, run_text, top_explained
    from neuron_assets.definitions import layout_of, subject_model_of

    check_s3_root(settings.storage)
    layout = layout_of(settings)
    keys = [layout.layer_key(i) for i in layout.layers]
    if args.layers:
        keys = chosen_layers(args.layers, keys)
    explained = load_explained(TableStorage(root=settings.storage), keys, layout.shard_keys())
    if explained.height == 0:
        where = f" for layer(s) {', '.join(keys)}" if args.layers else ""
        raise FileNotFoundError(f"no explained units in scores under {settings.storage}{where}: materialize "
                                "scores first (neuron-assets demo, or neuron-assets refresh --missing)")
    layers = sorted(explained["layer"].unique().to_list())
    subject = subject_model_of(settings)
    tokens, acts = run_text(subject, args.text, layers)
    hits = top_explained(acts, explained, args.top)
    print(f"{len(tokens)} tokens; explained units: {explained.height} in layer(s) "
          f"{', '.join(f'{layout.layer_key(i)} ({layout.hookpoint(i)})' for i in layers)}; top {args.top} per token and layer")
    print(format_hits(tokens, hits, layout.layer_key))


def refresh(args) -> None:
    """Observe the sources, then rerun what is stale, stage by stage (neuron_assets/refresh.py): in
    this process, or with --submit through the webserver's run queue, where the deployment's run
    launcher executes them (Kubernetes pods with the k8s launcher)."""
    settings = Settings.from_env()  # before the imports below (seconds): bad settings fail at once
    from functools import partial

    from neuron_assets.definitions import build_definitions
    from neuron_assets.progress import with_progress_bar
    from neuron_assets.refresh import refresh as refresh_stale

    check_s3_root(settings.storage)
    source_versions(settings)  # a setting that cannot be versioned fails here, before any run
    launch = materialize_runs
    if args.submit:
        from neuron_assets.submit import launch_runs

        launch = partial(launch_runs, args.submit)
    # Progress lines as a progress bar on a terminal (runs in this process); plain lines otherwise.
    launched = []

    def launch_noting(defs, instance, runs, **kwargs):
        launched.extend(runs)
        return launch(defs, instance, runs, **kwargs)

    defs = with_progress_bar(build_definitions(settings), tracebacks=args.verbose)
    with reporting_errors(settings.storage, launched):
        refresh_stale(defs, open_instance(), dry_run=args.dry_run, observe=not args.no_observe,
                      include_missing=args.missing, launch=launch_noting)
    exit_if_all_failed(settings.storage, launched)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="neuron-assets", description=__doc__)
    parser.add_argument("--verbose", action="store_true",
                        help="show the traceback of a failed step (default: its error message only)")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="materialize the whole graph for a small slice and print the scores")
    p.add_argument("--layers", nargs="+", default=None,
                   help=f"layer keys or numbers (default: the first {N_DEMO_LAYERS} layers in force, 00 01 for MLP neurons)")
    p.add_argument("--shards", type=int, default=1, help="shards per layer, from the first (default: 1)")
    p.set_defaults(run=demo)
    p = sub.add_parser("settings", help="the environment variables in force, and what a change of each makes stale")
    p.add_argument("--markdown", action="store_true", help="the settings table of the README, from the declaration")
    p.set_defaults(run=show_settings)
    sub.add_parser("scores", help="the per-layer score table of model_summary").set_defaults(run=scores)
    p = sub.add_parser("refresh", help="observe the weights, then materialize only the stale partitions")
    p.add_argument("--dry-run", action="store_true", help="list what would run, launch nothing")
    p.add_argument("--missing", action="store_true",
                   help="also fill missing partitions whose inputs exist (default: stale ones only)")
    p.add_argument("--no-observe", action="store_true", help="do not observe the sources (weights, settings) first")
    p.add_argument("--submit", metavar="URL",
                   help="submit the runs to the run queue of the Dagster webserver at URL (e.g. http://127.0.0.1:3000) "
                        "and wait for them, instead of running them in this process")
    p.set_defaults(run=refresh)
    p = sub.add_parser("explore", help="per token of a text, the most active explained neurons of each layer")
    p.add_argument("text", help="the text to run the subject model on")
    p.add_argument("--layers", nargs="+", help="layer keys or numbers (default: every layer with scores)")
    p.add_argument("--top", type=int, default=3, help="units per token and layer (default: 3)")
    p.set_defaults(run=explore)
    add_audit_parser(sub)
    args = parser.parse_args(argv)
    # Dagster marks MultiToSingleDimensionPartitionMapping as beta at every use; docs/operations.md says so once.
    from dagster import BetaWarning

    warnings.filterwarnings("ignore", category=BetaWarning)
    try:
        args.run(args)
    except KeyboardInterrupt:
        sys.exit("\nneuron-assets: interrupted. Every partition that finished is stored, and every LLM answer "
                 "received is in the response cache: run the same command again to go on from there.")
    except SettingsError as e:  # a usage error, as argparse's: exit status 2, one line per bad setting
        print("\n".join(f"neuron-assets: {problem}" for problem in e.problems), file=sys.stderr)
        sys.exit(2)
    except (ValueError, FileNotFoundError, InstanceError, StorageError) as e:
        sys.exit(f"neuron-assets: {e}")


if __name__ == "__main__":
    main()
