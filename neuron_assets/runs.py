"""Runs of asset selections, executed in this process or in step processes, each recorded in the
instance exactly as a run launched from the UI. `neuron-assets demo` and `refresh` run through here."""

import os
import re
import socket
import time
import warnings
from concurrent.futures import as_completed

from neuron_assets.partitions import run_target

# Dagster's own step events are DEBUG; INFO keeps the run logs' progress lines on the console.
RUN_HOST, RUN_PID = "neuron_assets/host", "neuron_assets/pid"
# Step processes fork from one server that has imported the graph (torch, transformers, dagster)
# once, instead of each importing it again (about 8 s a step on 2 cores).
FORKSERVER = {"start_method": {"forkserver": {"preload_modules": ["neuron_assets.definitions"]}}}
# "neuron_assets.resources.models.ModelFileError: ..." -> "ModelFileError: ..."
QUALIFIED = re.compile(r"^(?:\w+\.)+(\w+: )")
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
                                   partition_tags(defs, selection, partition)): (selection, partition)
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


def partition_tags(defs, selection, partition) -> dict[str, str]:
    key, tags = run_target(partition)
    if key is None:
        return tags
    return dict(defs.resolve_assets_def(selection[0]).partitions_def.get_tags_for_partition_key(key))


def _run_in_subprocesses(instance_ref, job_name: str, selection, tags: dict) -> str | None:
    """One run, each step in its own process; its failure as a message (None when it succeeded)."""
    from dagster import AssetKey, BetaWarning, DagsterInstance, execute_job
    # internal: no public API rebuilds a job of a repository built by a function, in a new process
    from dagster._core.definitions.reconstruct import ReconstructableRepository

    warnings.filterwarnings("ignore", category=BetaWarning)
    # Step processes rebuild the definitions from the environment: the same settings as the caller's.
    job = ReconstructableRepository.for_module("neuron_assets.definitions", "defs").get_reconstructable_job(job_name)
    with DagsterInstance.from_ref(instance_ref) as instance:
        result = execute_job(job, instance, tags={**tags, **_owner()}, asset_selection=[AssetKey(name) for name in selection],
                             run_config={**QUIET, "execution": {"config": {"multiprocess": FORKSERVER}}})
        return None if result.success else _failure(result)


def _raise_if_failed(result) -> None:
    if result.success:
        return
    # Ctrl-C inside a step reaches us as a failed run: it is an interrupt, for the CLI to say so
    if any(error.cls_name == "DagsterExecutionInterruptedError" for error in _errors(result)):
        raise KeyboardInterrupt
    raise SystemExit(_failure(result))


def _errors(result) -> list:
    """Every error of the run's events, with the errors that caused them."""
    out = []
    for event in result.all_events:
        error = getattr(event.event_specific_data, "error", None)
        while error is not None:
            out.append(error)
            error = error.cause
    return out


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
    message = QUALIFIED.sub(r"\1", error.message.strip())
    return f"run {result.run_id} failed: {message}"


def shard_keys(defs) -> list[str]:
    return defs.resolve_assets_def("scores").partitions_def.get_partitions_def_for_dimension("shard").get_partition_keys()


def layer_keys(defs) -> list[str]:
    return defs.resolve_assets_def("scores").partitions_def.get_partitions_def_for_dimension("layer").get_partition_keys()
