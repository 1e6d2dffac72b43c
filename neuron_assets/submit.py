"""Submit runs to a Dagster deployment's run queue instead of executing them in this process.

`neuron_assets.runs.materialize_runs` executes each run here (or in subprocesses of this
process), on this machine. `launch_runs` hands each run to the deployment's webserver (GraphQL
`launchRun`, as the UI's Materialize button does): the webserver's run coordinator queues it, and
the daemon launches it wherever the deployment's run launcher says (a Kubernetes Job with the k8s
run launcher, a subprocess of the code server under `dagster dev`), with the deployment's code,
resources and limits. This process only waits, reading the runs' statuses from the instance, which
must be the deployment's (the same run storage: $DAGSTER_HOME/dagster.yaml pointing at its database).

`neuron-assets refresh --submit URL` passes `functools.partial(launch_runs, URL)` where it would
pass `materialize_runs`: the same call shape, `(defs, instance, runs, log=...)`.
"""

import json
import os
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Callable

from dagster import AssetKey, DagsterEventType, DagsterRunStatus

from neuron_assets.graph import Run
from neuron_assets.partitions import run_target

ASSET_JOB = "__ASSET_JOB"  # the name of the implicit job of all assets (Definitions' asset job, 1.13)
SUBMITTED_BY, SUBMITTED_FROM = "neuron_assets/submitted_by", "neuron_assets/submitted_from"
TERMINAL = {DagsterRunStatus.SUCCESS, DagsterRunStatus.FAILURE, DagsterRunStatus.CANCELED}

WORKSPACE = """
query NeuronAssetsWorkspace { workspaceOrError { __typename
  ... on Workspace { locationEntries { name loadStatus locationOrLoadError { __typename
      ... on RepositoryLocation { name repositories { name jobs { name } assetNodes { assetKey { path } } } }
      ... on PythonError { message } } } }
  ... on PythonError { message } } }
"""

LAUNCH_RUN = """
mutation NeuronAssetsLaunchRun($executionParams: ExecutionParams!) {
  launchRun(executionParams: $executionParams) { __typename
    ... on LaunchRunSuccess { run { runId } }
    ... on RunConfigValidationInvalid { errors { message } }
    ... on InvalidStepError { invalidStepKey }
    ... on InvalidOutputError { stepKey invalidOutputName }
    ... on Error { message } } }
"""



def graphql(url: str, query: str, variables: dict | None = None, timeout: float = 60) -> dict:
    """POST a GraphQL query to the webserver at `url`; its `data`. An unreachable server, an HTTP
    error or GraphQL errors are ValueErrors naming the URL."""
    body = json.dumps({"query": query, "variables": variables or {}}).encode()
    request = urllib.request.Request(f"{url}/graphql", data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as answer:
            text = answer.read()
    except urllib.error.HTTPError as e:  # a GraphQL validation error comes back as HTTP 400 with its errors
        text = e.read()
        try:
            result = json.loads(text)
        except ValueError:
            result = {}
        if not (isinstance(result, dict) and result.get("errors")):
            raise ValueError(f"{url}/graphql answered HTTP {e.code} {e.reason}: is {url} a Dagster webserver? "
                             f"{text[:200].decode(errors='replace')}") from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise ValueError(f"no Dagster webserver answers at {url} ({reason}): start `dagster dev` (make ui) there, "
                         f"or pass the URL of the deployment's webserver") from None
    else:
        try:
            result = json.loads(text)
        except ValueError:
            raise ValueError(f"{url}/graphql did not answer JSON: is {url} a Dagster webserver? "
                             f"{text[:200].decode(errors='replace')}") from None
    if result.get("errors"):
        messages = "; ".join(str(e.get("message", e)) for e in result["errors"])
        raise ValueError(f"the Dagster webserver at {url} answered GraphQL errors: {messages}")
    return result["data"]


def find_repository(url: str, assets: set[str]) -> tuple[str, str]:
    """(code location, repository) of the webserver's repository with the implicit asset job that
    holds the most of `assets` (the first one on a tie), from its workspace."""
    workspace = graphql(url, WORKSPACE)["workspaceOrError"]
    if workspace["__typename"] != "Workspace":
        raise ValueError(f"the Dagster webserver at {url} could not list its workspace: {workspace.get('message')}")
    found, broken = [], []
    for entry in workspace["locationEntries"]:
        location = entry["locationOrLoadError"]
        if location is None:
            broken.append(f"{entry['name']} ({entry['loadStatus'].lower()})")
            continue
        if location["__typename"] == "PythonError":
            broken.append(f"{entry['name']} (failed to load: {_first_line(location['message'])})")
            continue
        for repo in location["repositories"]:
            if any(job["name"] == ASSET_JOB for job in repo["jobs"]):
                keys = {AssetKey(node["assetKey"]["path"]).to_user_string() for node in repo["assetNodes"]}
                found.append((len(assets & keys), location["name"], repo["name"]))
    if not found:
        raise ValueError(f"the Dagster webserver at {url} has no code location with assets"
                         + (f"; not loaded: {', '.join(broken)}" if broken else ""))
    best = max(n for n, _, _ in found)
    return next((location, repo) for n, location, repo in found if n == best)


def launch_run(url: str, location: str, repository: str, selection: tuple[str, ...], tags: dict[str, str],
               run_config: dict | None = None) -> str:
    """Submit one run of the implicit asset job to the webserver; its run id."""
    params = {
        "selector": {"repositoryLocationName": location, "repositoryName": repository, "jobName": ASSET_JOB,
                     "assetSelection": [{"path": AssetKey.from_user_string(name).path} for name in selection]},
        "executionMetadata": {"tags": [{"key": k, "value": v} for k, v in tags.items()]},
    }
    if run_config:
        params["runConfigData"] = run_config
    result = graphql(url, LAUNCH_RUN, {"executionParams": params})["launchRun"]
    kind = result["__typename"]
    if kind == "LaunchRunSuccess":
        return result["run"]["runId"]
    if kind == "RunConfigValidationInvalid":
        message = "; ".join(e["message"] for e in result["errors"])
    elif kind == "InvalidStepError":
        message = f"invalid step {result['invalidStepKey']}"
    elif kind == "InvalidOutputError":
        message = f"invalid output {result['invalidOutputName']} of step {result['stepKey']}"
    else:
        message = _first_line(result.get("message") or "")
    hint = (" (the webserver's code location is not built from the same settings as this process: "
            "compare its NEURON_ASSETS_* variables)") if kind == "InvalidSubsetError" else ""
    raise ValueError(f"the Dagster webserver at {url} refused the run of {', '.join(selection)} ({kind}): "
                     f"{message}{hint}")


def run_tags(defs, selection: tuple[str, ...], partition) -> dict[str, str]:
    """A run's partition as Dagster's tags: `dagster/partition` (and, for a multi-partition key, one
    tag per dimension), or the range tags of a single-run backfill."""
    key, tags = run_target(partition)
    if key is None:
        return tags
    partitions_def = defs.resolve_assets_def(selection[0]).partitions_def
    if partitions_def is None:
        raise ValueError(f"{selection[0]} is not partitioned; got partition {key!r}")
    return dict(partitions_def.get_tags_for_partition_key(key))


def launch_runs(url: str, defs, instance, runs: list[Run], log: Callable[[str], None] = print,
                poll_s: float = 1.0, timeout_s: float | None = None, submitter: str = "refresh",
                run_config: dict | None = None) -> None:
    """Submit `runs` ((selection, partition or (start, end) range), as for `materialize_runs`) to
    the Dagster webserver at `url`, then wait until each has finished, reading its status from
    `instance` (the deployment's instance). The runs are one stage: all are submitted at once, and
    the deployment's run queue decides how many run together.

    Assets that the settings leave out of `defs` are dropped from the selections, as
    `materialize_runs` does. Tags: the partition's, `neuron_assets/submitted_by=<submitter>` and
    `neuron_assets/submitted_from=<this host>`. `run_config` (default: none, the deployment's
    executor and its defaults) goes with every run, e.g. `{"execution": {"config": {"in_process": {}}}}`
    with the default executor. A refused submission or an unreachable webserver is
    a ValueError (runs submitted before it go on); a failed or canceled run, or `timeout_s` passed,
    is a SystemExit naming the runs and their pages in the UI (runs still going on go on).
    """
    url = url.rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"the Dagster webserver URL must start with http:// or https://, got {url!r}")
    present = {key.to_user_string() for key in defs.resolve_all_asset_keys()}
    runs = [(selection, partition) for selection, partition in
            ((tuple(name for name in selection if name in present), partition) for selection, partition in runs)
            if selection]
    if not runs:
        return
    location, repository = find_repository(url, {name for selection, _ in runs for name in selection})
    submitted: dict[str, Run] = {}
    for selection, partition in runs:
        tags = {**run_tags(defs, selection, partition), SUBMITTED_BY: submitter, SUBMITTED_FROM: socket.gethostname()}
        try:
            submitted[launch_run(url, location, repository, selection, tags, run_config)] = (selection, partition)
        except ValueError as e:
            if submitted:
                raise ValueError(f"{e}; the {len(submitted)} run(s) submitted before it go on: "
                                 + ", ".join(_page(url, r) for r in submitted)) from None
            raise
    started = time.monotonic()
    log(f"submitted {len(submitted)} run(s) to {url}: {', '.join(submitted)}")
    try:
        statuses = _wait(url, instance, submitted, started, log, poll_s, timeout_s)
    except KeyboardInterrupt:
        raise SystemExit("stopped waiting; the runs go on in the deployment: "
                         + ", ".join(_page(url, r) for r in submitted)) from None
    failed = [run_id for run_id, status in statuses.items() if status != DagsterRunStatus.SUCCESS]
    if failed:
        raise SystemExit(f"{len(failed)} of {len(submitted)} run(s) submitted to {url} did not succeed:\n"
                         + "\n".join(f"  {_what(*submitted[r])}: {statuses[r].value}: {_failure(instance, r)} "
                                     f"(see {_page(url, r)})" for r in failed))


def _wait(url, instance, submitted: dict[str, Run], started: float, log, poll_s: float,
          timeout_s: float | None) -> dict[str, DagsterRunStatus]:
    """Poll the instance until every submitted run is SUCCESS, FAILURE or CANCELED; their statuses."""
    done: dict[str, DagsterRunStatus] = {}
    last: dict[str, DagsterRunStatus] = {}
    next_summary = started + 60
    while True:
        for run_id in [r for r in submitted if r not in done]:
            run = instance.get_run_by_id(run_id)
            if run is None:
                if time.monotonic() - started > 10:
                    raise ValueError(
                        f"run {run_id}, submitted to {url}, is not in this process's Dagster instance "
                        f"(DAGSTER_HOME={os.environ.get('DAGSTER_HOME', '(unset)')}): the webserver stores its "
                        "runs elsewhere; point DAGSTER_HOME at a dagster.yaml with the deployment's storage")
                continue
            last[run_id] = run.status
            if run.status in TERMINAL:
                done[run_id] = run.status
                log(f"run {run_id} {run.status.value} ({time.monotonic() - started:.0f} s): "
                    f"{_what(*submitted[run_id])}")
        if len(done) == len(submitted):
            return done
        now = time.monotonic()
        if timeout_s is not None and now - started > timeout_s:
            waiting = [r for r in submitted if r not in done]
            failed = [r for r, status in done.items() if status != DagsterRunStatus.SUCCESS]
            raise SystemExit(
                f"timed out after {timeout_s:.0f} s waiting for {len(waiting)} of {len(submitted)} run(s) "
                f"submitted to {url}; they go on in the deployment:\n"
                + "\n".join(f"  {_what(*submitted[r])}: {last[r].value if r in last else 'UNKNOWN'} "
                            f"(see {_page(url, r)})" for r in waiting)
                + "".join(f"\n  {_what(*submitted[r])}: {done[r].value}: {_failure(instance, r)} (see {_page(url, r)})"
                          for r in failed))
        if now >= next_summary:
            counts: dict[str, int] = {}
            for r in submitted.keys() - done.keys():
                status = last[r].value if r in last else "UNKNOWN"
                counts[status] = counts.get(status, 0) + 1
            log(f"waiting for {len(submitted) - len(done)} run(s) ({now - started:.0f} s): "
                + ", ".join(f"{n} {status}" for status, n in sorted(counts.items())))
            next_summary = now + 60
        time.sleep(poll_s)


def _what(selection: tuple[str, ...], partition) -> str:
    if isinstance(partition, tuple):
        return f"{', '.join(selection)} [{partition[0]}..{partition[1]}]"
    where = f" [{partition}]" if partition else ""
    return f"{', '.join(selection)}{where}"


def _page(url: str, run_id: str) -> str:
    return f"{url}/runs/{run_id}"


def _failure(instance, run_id: str) -> str:
    """The user's error of the run's first failed step (the innermost cause), else the run failure's message."""
    try:
        records = instance.all_logs(run_id, of_type={DagsterEventType.STEP_FAILURE, DagsterEventType.RUN_FAILURE})
    except Exception:  # the reason is a courtesy: never hide the failure itself behind a storage error
        return "see the run's log"
    steps = [r for r in records if r.dagster_event.event_type == DagsterEventType.STEP_FAILURE]
    for record in steps or records:
        error = getattr(record.dagster_event.event_specific_data, "error", None)
        if error is not None:
            while error.cause is not None:
                error = error.cause
            return _one_line(error.message)
        if record.message:
            return _one_line(record.message)
    return "see the run's log"


def _one_line(text: str, limit: int = 500) -> str:
    """A message on one line (Dagster's wrap theirs with indentation), at most `limit` characters."""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _first_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[0].strip() if lines else "(no message)"
