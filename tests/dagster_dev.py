"""`dagster dev` as a real subprocess for the UI tests: an on-disk instance home, a free loopback
port, readiness by `GET /server_info`, GraphQL over plain HTTP, and a stop that kills the whole
process group (the webserver, the daemon and the code server are children of `dagster dev`)."""

import contextlib
import json
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import yaml
from services import free_port

REPO = Path(__file__).resolve().parents[1]
DAGSTER = REPO / ".venv" / "bin" / "dagster"


def make_home(home: Path) -> Path:
    """A DAGSTER_HOME with the repo's dagster.yaml, telemetry and the first-run tour (nux) off."""
    home.mkdir(parents=True, exist_ok=True)
    config = yaml.safe_load((REPO / "resources" / "dagster.yaml").read_text()) or {}
    config["telemetry"] = {"enabled": False}
    config["nux"] = {"enabled": False}
    (home / "dagster.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return home


def _tail(path: Path, n: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""


def _stop(process: subprocess.Popen, timeout: float = 20) -> None:
    if process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=timeout)
    # children that outlived the leader are still in the group: make sure none is left
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)


@contextlib.contextmanager
def dagster_dev(home: Path, env: dict[str, str], log_dir: Path, ready_s: float = 120):
    """Start `dagster dev` on a free port from the repo root; yield its base URL once `/server_info`
    answers; always stop its process group. `env` is added to this process's environment."""
    port = free_port()
    log_dir.mkdir(parents=True, exist_ok=True)
    stdout, stderr = log_dir / "dagster_dev.stdout", log_dir / "dagster_dev.stderr"
    full_env = {**os.environ, **env, "DAGSTER_HOME": str(home), "PYTHONPATH": str(REPO)}
    with open(stdout, "wb") as out, open(stderr, "wb") as err:
        process = subprocess.Popen(
            [str(DAGSTER), "dev", "-h", "127.0.0.1", "-p", str(port), "-w", "workspace.yaml"],
            cwd=REPO, env=full_env, stdout=out, stderr=err, stdin=subprocess.DEVNULL, start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + ready_s
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"dagster dev exited with {process.returncode} before it was ready; "
                                   f"stderr tail:\n{_tail(stderr)}")
            try:
                with urllib.request.urlopen(f"{url}/server_info", timeout=5) as answer:
                    if answer.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"dagster dev did not answer GET /server_info within {ready_s:.0f} s; "
                                   f"stderr tail:\n{_tail(stderr)}")
            time.sleep(0.5)
        yield url
    finally:
        _stop(process)


def graphql(url: str, query: str, variables: dict | None = None, timeout: float = 60) -> dict:
    """POST a GraphQL query; return its `data`, raising on transport or GraphQL errors."""
    body = json.dumps({"query": query, "variables": variables or {}}).encode()
    request = urllib.request.Request(f"{url}/graphql", data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as answer:
        result = json.loads(answer.read())
    if result.get("errors"):
        raise AssertionError(f"GraphQL errors: {result['errors']}")
    return result["data"]


LOCATIONS = """
query { workspaceOrError { __typename ... on Workspace { locationEntries { name loadStatus
  locationOrLoadError { __typename ... on PythonError { message stack } } } } } }
"""


def wait_for_code_location(url: str, seconds: float = 120) -> None:
    """`/server_info` answers before the code server has loaded the definitions: wait until every
    code location is LOADED, and fail with its error if one could not load."""
    deadline = time.monotonic() + seconds
    while True:
        entries = graphql(url, LOCATIONS)["workspaceOrError"].get("locationEntries") or []
        if entries and all(e["loadStatus"] == "LOADED" for e in entries):
            failed = [e for e in entries if e["locationOrLoadError"]["__typename"] == "PythonError"]
            if failed:
                error = failed[0]["locationOrLoadError"]
                raise RuntimeError(f"code location {failed[0]['name']} failed to load: {error['message']}"
                                   + "".join(error["stack"][-5:]))
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"the code locations did not load within {seconds:.0f} s: {entries}")
        time.sleep(0.5)
