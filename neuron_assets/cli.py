"""`neuron-assets`: the demo, the settings in force, and a per-layer score table."""

import argparse
import os
import socket
import sys
import time
import warnings
from concurrent.futures import as_completed

from neuron_assets.audit import add_audit_parser
from neuron_assets.instance import InstanceError, open_instance
from neuron_assets.partitions import run_target
from neuron_assets.resources.files import StorageError, check_s3_root
from neuron_assets.settings import SECRETS, SETTINGS, Settings

DEMO_LAYERS = ("00", "01", "02")
# Dagster's own step events are DEBUG; INFO keeps the run logs' progress lines on the console.
RUN_HOST, RUN_PID = "neuron_assets/host", "neuron_assets/pid"
# Step processes fork from one server that has imported the graph (torch, transformers, dagster)
# once, instead of each importing it again (about 8 s a step on 2 cores).
FORKSERVER = {"start_method": {"forkserver": {"preload_modules": ["neuron_assets.definitions"]}}}
QUIET = {"loggers": {"console": {"config": {"log_level": "INFO"}}}}


def materialize_runs(defs, instance, runs, log=print, workers: int = 1) -> None:
    """Materialize (selection, partition or (start, end) range) runs, stage by stage.

    Each run is recorded in the instance, so it shows in the Dagster UI exactly as a run launched
    there. With one worker, runs go one after another in this process, which keeps the models
    loaded across runs. With more, the runs of a stage (consecutive runs of the same assets, such
    as the layer x shard runs) go `workers` at a time, each step in its own process (the
    multiprocess executor), and the 'llm' pool limits how many LLM steps run at once. Assets that
    the settings leave out of the graph (e.g. revised_explanations with NEURON_ASSETS_REVISION=off)
    are dropped from the selections.
    """
    present = {key.to_user_string() for key in defs.resolve_all_asset_keys()}
    runs = [(selection, partition) for selection, partition in
            ((tuple(name for name in selection if name in present), partition) for selection, partition in runs)
            if selection]
    release_dead_runs(instance, log)
    started = time.monotonic()
    done = 0

    def note(selection, partition, key):
        nonlocal done
        done += 1
        where = f" [{partition[0]}..{partition[1]}]" if isinstance(partition, tuple) else (f" [{key}]" if key else "")
        log(f"[{done}/{len(runs)}] {time.monotonic() - started:6.0f}s  {', '.join(selection)}{where}")

    if workers <= 1:
        job = defs.resolve_implicit_global_asset_job_def()
        for selection, partition in runs:
            note(selection, partition, run_target(partition)[0])
            _raise_if_failed(_run_in_process(job, instance, selection, partition))
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    # One process per run: Dagster's run logging is not safe for two runs in threads of one process.
    job = defs.resolve_implicit_global_asset_job_def()
    # Create each pool's slots now: step processes that start together and each create the
    # slots of a new pool race, and can make more slots than the limit.
    for pool in {op.pool for op in job.graph.node_defs if getattr(op, "pool", None)}:
        instance.event_log_storage.initialize_concurrency_limit_to_default(pool)
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as processes:
        for stage in _stages(runs):
            futures = {processes.submit(_run_in_subprocesses, instance.get_ref(), job.name, selection,
                                   _partition_tags(defs, selection, partition)): (selection, partition)
                       for selection, partition in stage}
            failures = []
            for future in as_completed(futures):
                selection, partition = futures[future]
                failure = future.result()
                note(selection, partition, run_target(partition)[0])
                if failure:
                    failures.append(failure)
            if failures:
                raise SystemExit("\n".join(failures))


def _owner() -> dict[str, str]:
    """Tags naming the process that executes a run, so that a later call can tell it died."""
    return {RUN_HOST: socket.gethostname(), RUN_PID: str(os.getpid())}


def release_dead_runs(instance, log=print) -> None:
    """Mark failed the runs started by this CLI on this machine whose process is gone (SIGKILL, out
    of memory), and give back their pool slots: otherwise a killed LLM step holds its 'llm' slot
    forever and the next run waits for it. (Runs from the UI or a daemon: Dagster's run monitoring.)"""
    from dagster import DagsterRunStatus, RunsFilter

    in_flight = RunsFilter(statuses=[DagsterRunStatus.STARTING, DagsterRunStatus.STARTED],
                           tags={RUN_HOST: socket.gethostname()})
    for run in instance.get_runs(filters=in_flight):
        pid = int(run.tags[RUN_PID])
        try:
            os.kill(pid, 0)
            continue
        except ProcessLookupError:
            pass
        except PermissionError:  # alive, under another user
            continue
        instance.report_run_failed(run, f"the process {pid} that executed this run is gone (killed?)")
        instance.event_log_storage.free_concurrency_slots_for_run(run.run_id)
        log(f"run {run.run_id}: its process {pid} is gone; marked failed, its pool slots given back")


def _stages(runs: list) -> list[list]:
    """Consecutive runs of the same assets: independent of each other, dependent on earlier stages."""
    stages: list[list] = []
    for run in runs:
        if stages and stages[-1][0][0] == run[0]:
            stages[-1].append(run)
        else:
            stages.append([run])
    return stages


def _run_in_process(job, instance, selection, partition):
    from dagster import AssetKey

    key, tags = run_target(partition)
    return job.execute_in_process(
        instance=instance, partition_key=key, tags={**tags, **_owner()}, run_config=QUIET,
        asset_selection=[AssetKey(name) for name in selection], raise_on_error=False,
    )


def _partition_tags(defs, selection, partition) -> dict[str, str]:
    key, tags = run_target(partition)
    if key is None:
        return tags
    return dict(defs.resolve_assets_def(selection[0]).partitions_def.get_tags_for_partition_key(key))


def _run_in_subprocesses(instance_ref, job_name: str, selection, tags: dict) -> str | None:
    """One run, each step in its own process; its failure as a message (None when it succeeded)."""
    from dagster import AssetKey, BetaWarning, DagsterInstance, execute_job
    from dagster._core.definitions.reconstruct import ReconstructableRepository

    warnings.filterwarnings("ignore", category=BetaWarning)
    # Step processes rebuild the definitions from the environment: the same settings as the caller's.
    job = ReconstructableRepository.for_module("neuron_assets.definitions", "defs").get_reconstructable_job(job_name)
    with DagsterInstance.from_ref(instance_ref) as instance:
        result = execute_job(job, instance, tags={**tags, **_owner()}, asset_selection=[AssetKey(name) for name in selection],
                             run_config={**QUIET, "execution": {"config": {"multiprocess": FORKSERVER}}})
        return None if result.success else _failure(result)


def _raise_if_failed(result) -> None:
    if not result.success:
        raise SystemExit(_failure(result))


def _failure(result) -> str:
    """The user's error (e.g. a bad setting) of the first failed step or resource, not Dagster's
    wrapper around it."""
    errors = [e.event_specific_data.error for e in result.all_events
              if getattr(e.event_specific_data, "error", None) is not None]
    if not errors:
        return f"run {result.run_id} failed: see the run log"
    error = errors[0]
    while error.cause is not None:
        error = error.cause
    return f"run {result.run_id} failed: {error.message.strip()}"


def shard_keys(defs) -> list[str]:
    return defs.resolve_assets_def("scores").partitions_def.get_partitions_def_for_dimension("shard").get_partition_keys()


# per layer x shard, in graph order; those the settings leave out of the graph are skipped
SHARD_ASSETS = ("explanations", "revised_explanations", "imported_explanations", "simulations", "scores",
                "detection_scores")


def demo_runs(layers: tuple[str, ...], shards: list[str]) -> list:
    # Observing the weights first lets Dagster notice when a later checkpoint changes a layer.
    runs = [(("subject_model_weights",), None), (("corpus_documents", "corpus_tokens"), None),
            (("neuron_records",), (layers[0], layers[-1]))]
    runs += [(SHARD_ASSETS, f"{layer}|{shard}") for layer in layers for shard in shards]
    runs += [(("layer_summary", "exported_neurons", "neuron_viewer"), layer) for layer in layers]
    runs += [(("model_summary", "neuron_viewer_index"), None)]
    return runs


# (column of the quality report, header, width); a column missing from the summary is not printed
REPORT = (("mean_score_all", "mean", 7), ("share_at_least_0.8", ">=0.8", 6), ("control_mean_score_all", "control", 8),
          ("margin_over_control", "margin", 7), ("gain_over_llm", "gain", 7),
          ("mean_detection_random", "det.rnd", 8), ("mean_detection_hard", "det.hard", 9),
          ("mean_fuzzing_random", "fuz.rnd", 8), ("mean_fuzzing_hard", "fuz.hard", 9))


def score_table(storage_root: str) -> str:
    """The quality report of model_summary as text: one line per layer x variant (x simulation
    method); NaN where nothing could be computed, '-' where the column does not apply."""
    from neuron_assets.assets.scores import quality_report
    from neuron_assets.resources.storage import TableStorage

    report = quality_report(TableStorage(root=storage_root).read("model_summary"))
    columns = [c for c in REPORT if c[0] in report.columns]
    lines = [f"{'layer':>5}  {'variant':<16}{'method':<14}{'neurons':>8}"
             + "".join(f"{header:>{width}}" for _, header, width in columns) + f"{'cost $':>10}"]

    def cell(value, width):
        if value is None:
            return f"{'-':>{width}}"
        return f"{'nan':>{width}}" if value != value else f"{value:{width}.3f}"

    for r in report.iter_rows(named=True):
        lines.append(f"{r['layer']:>5}  {r['variant']:<16}{r['method']:<14}{r['neurons']:>8}"
                     + "".join(cell(r[name], width) for name, _, width in columns) + f"{r['cost_usd']:10.4f}")
    return "\n".join(lines)


def demo(args) -> None:
    settings = Settings.from_env()
    print(f"neuron_assets demo: subject, explainer and simulator = {settings.model}, corpus = {settings.corpus}; "
          f"layers {', '.join(args.layers)}, the first {args.shards} of {settings.shards} shards per layer, "
          f"neurons per shard = {settings.neurons}")
    check_s3_root(settings.storage)  # an unusable s3:// root fails here, before any run
    print("loading definitions (the first run converts the embedded GGUF model once, ~30 s)...")
    from neuron_assets.assets.common import viewer_page
    from neuron_assets.definitions import build_definitions
    from neuron_assets.progress import with_progress_bar

    # Progress lines as a progress bar on a terminal (runs in this process); plain lines otherwise.
    defs = with_progress_bar(build_definitions(settings))
    instance = open_instance()
    shards = shard_keys(defs)[: args.shards]
    started = time.monotonic()
    materialize_runs(defs, instance, demo_runs(tuple(args.layers), shards), workers=settings.workers)
    print(f"\ndone in {time.monotonic() - started:.0f} s. Scores (score_all = top-and-random correlation):\n")
    print(score_table(settings.storage))
    print(f"\nNeuron viewer: {viewer_page(settings.storage)}")
    print(f"Tables:        {settings.storage}/<asset>/<partition>/*.parquet")
    print(f"Dagster home:  {os.environ['DAGSTER_HOME']}")
    print("Open the UI:   make ui   then http://127.0.0.1:3000 (Assets > neuron_records, scores, ...)")


def show_settings(args) -> None:
    current = Settings.from_env()
    for setting in SETTINGS:
        value = os.environ.get(setting.env) or setting.default
        if setting.env.endswith(SECRETS):  # never print a secret
            value = "(set)" if value else "(unset)"
        print(f"{setting.env}={value}\n    {setting.help}")
    print(f"\nresolved storage root: {current.storage}")


def scores(args) -> None:
    print(score_table(Settings.from_env().storage))


def explore(args) -> None:
    """Run the subject model on a text and print, per token, the most active explained neurons of
    each layer that has scores (neuron_assets/explorer.py)."""
    from neuron_assets.explorer import format_hits, load_explained, run_text, top_explained
    from neuron_assets.partitions import build_layout
    from neuron_assets.resources.models import model_shape
    from neuron_assets.resources.storage import TableStorage
    from neuron_assets.resources.subject_model import SubjectModel

    settings = Settings.from_env()
    check_s3_root(settings.storage)
    shape = model_shape(settings.model, settings.cache)
    layout = build_layout(settings.layers, shape.n_layers, shape.n_neurons, settings.shards)
    keys = [layout.layer_key(i) for i in layout.layers]
    if args.layers:
        try:
            wanted = [layout.layer_key(int(k)) for k in args.layers]
        except ValueError:
            raise ValueError(f"--layers takes layer numbers or keys (such as {keys[0]}), got {args.layers}") from None
        unknown = [k for k in wanted if k not in keys]
        if unknown:
            raise ValueError(f"layer(s) {', '.join(unknown)} are not among the layers of these settings: {', '.join(keys)}")
        keys = wanted
    explained = load_explained(TableStorage(root=settings.storage), keys, layout.shard_keys())
    if explained.height == 0:
        where = f" for layer(s) {', '.join(keys)}" if args.layers else ""
        raise FileNotFoundError(f"no explained neurons in scores under {settings.storage}{where}: materialize "
                                "scores first (neuron-assets demo, or neuron-assets refresh --missing)")
    layers = sorted(explained["layer"].unique().to_list())
    subject = SubjectModel(model=settings.model, cache=settings.cache, device=settings.device,
                           batch_size=settings.batch_size)
    tokens, acts = run_text(subject, args.text, layers)
    hits = top_explained(acts, explained, args.top)
    print(f"{len(tokens)} tokens; explained neurons: {explained.height} in layer(s) "
          f"{', '.join(layout.layer_key(i) for i in layers)}; top {args.top} per token and layer")
    print(format_hits(tokens, hits, layout.layer_key))


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
    p = sub.add_parser("explore", help="per token of a text, the most active explained neurons of each layer")
    p.add_argument("text", help="the text to run the subject model on")
    p.add_argument("--layers", nargs="+", help="layer keys or numbers (default: every layer with scores)")
    p.add_argument("--top", type=int, default=3, help="neurons per token and layer (default: 3)")
    p.set_defaults(run=explore)
    add_audit_parser(sub)
    args = parser.parse_args(argv)
    # Dagster marks MultiToSingleDimensionPartitionMapping as beta at every use; the README says so once.
    from dagster import BetaWarning

    warnings.filterwarnings("ignore", category=BetaWarning)
    try:
        args.run(args)
    except (ValueError, FileNotFoundError, InstanceError, StorageError) as e:
        sys.exit(f"neuron-assets: {e}")


if __name__ == "__main__":
    main()
