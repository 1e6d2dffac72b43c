"""The console progress bar: Progress log lines drawn as one bar on a TTY, plain lines elsewhere."""

import io
import json
import logging
import os
import pty
import re
import subprocess
import sys
from pathlib import Path

import pytest

from neuron_assets.progress import ProgressBarHandler, progress_console_logger
from neuron_assets.stages.timing import Progress, ProgressState, log_reporter

WHAT, UNIT = "forward pass, layers 00..01", "windows"
BAR = re.compile(r"forward pass, layers 00\.\.01 \[(?P<bar>[#-]{10})\] (?P<pct>\d+)% (?P<done>\d+)/4 windows "
                 r"[0-9.]+/s ETA \d+ s")


class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def screen(text: str) -> list[str]:
    """What a terminal shows after `text`: '\\r' returns to the start of the line, characters
    overwrite, colour codes take no room."""
    lines, line, cursor = [], [], 0
    for ch in re.sub(r"\x1b\[[0-9;]*m", "", text):
        if ch == "\n":
            lines.append("".join(line).rstrip())
            line, cursor = [], 0
        elif ch == "\r":
            cursor = 0
        else:
            if cursor < len(line):
                line[cursor] = ch
            else:
                line.append(ch)
            cursor += 1
    if line:
        lines.append("".join(line).rstrip())
    return lines


@pytest.fixture(autouse=True)
def wide_terminal(monkeypatch):
    """Bars are cut to the terminal's width (shutil.get_terminal_size reads COLUMNS first)."""
    monkeypatch.setenv("COLUMNS", "200")


@pytest.fixture
def log():
    """A real Python logger whose only handler is the one under test."""
    logger = logging.getLogger("test_progress")
    logger.setLevel(logging.INFO)
    logger.propagate = False
    yield logger
    logger.handlers.clear()


def steps(logger: logging.Logger, n: int, total: int = 4) -> Progress:
    progress = Progress(log_reporter(logger.info), total, WHAT, UNIT, every=0.0)  # every advance logs
    for _ in range(n):
        progress.advance()
    return progress


def test_tty_draws_one_bar_in_place_and_clears_it_before_other_lines(log):
    stream = FakeTTY()
    log.addHandler(ProgressBarHandler(stream=stream))
    log.info("loading")
    progress = steps(log, 2)
    out = stream.getvalue()
    # the bar is redrawn with '\r', never on a new line, and the Progress text itself is not printed
    assert out.count("\n") == 1 and out.count("\r") >= 2
    assert "windows: 2/4" not in out
    assert screen(out)[-1].startswith("forward pass, layers 00..01 [#####-----] 50% 2/4 windows ")
    log.warning("a normal line while the bar is half drawn")
    progress.advance()  # 3/4
    progress.advance()  # 4/4: the bar is finished and stays, on its own line
    log.info("after")
    shown = screen(stream.getvalue())
    assert len(shown) == 4, shown
    assert shown[0].endswith(" - test_progress - INFO - loading")
    # the normal line starts at column 0 of a cleared line: no remains of the bar before or after it
    assert "WARNING" in shown[1] and shown[1].endswith("a normal line while the bar is half drawn")
    assert "[" not in shown[1].split(" - ")[0] and "#" not in shown[1]
    final = BAR.fullmatch(shown[2])
    assert final and final["bar"] == "#" * 10 and final["pct"] == "100" and final["done"] == "4"
    assert shown[3].endswith("after")


def test_a_shorter_bar_leaves_nothing_of_a_longer_one(log):
    stream = FakeTTY()
    log.addHandler(ProgressBarHandler(stream=stream))
    report = log_reporter(log.info)
    report(ProgressState("x", "items", 5, 10, 12345.6, 123456))
    report(ProgressState("x", "items", 6, 10, 1.0, 4))
    (line,) = screen(stream.getvalue())
    assert line == "x [######----] 60% 6/10 items 1.0/s ETA 4 s"


def test_a_bar_wider_than_the_terminal_is_cut_to_fit(log, monkeypatch):
    monkeypatch.setenv("COLUMNS", "40")  # a wrapped line could not be redrawn with '\\r'
    stream = FakeTTY()
    log.addHandler(ProgressBarHandler(stream=stream))
    steps(log, 1)
    (line,) = screen(stream.getvalue())
    assert len(line) < 40 and line.startswith("forward pass, layers 00..01 [") and line.endswith("…")


def test_not_a_tty_gets_every_message_as_a_plain_line(log):
    stream = io.StringIO()  # isatty() is False: a CI log or a pipe
    log.addHandler(ProgressBarHandler(stream=stream))
    log.info("loading")
    steps(log, 4)
    out = stream.getvalue()
    assert "\r" not in out and "[#" not in out
    lines = out.splitlines()
    assert len(lines) == 5
    assert [re.search(r"windows: (\d)/4", line)[1] for line in lines[1:]] == ["1", "2", "3", "4"]
    assert all(re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d [+-]\d{4} - test_progress - INFO - ", line) for line in lines)


def test_only_records_carrying_a_state_are_drawn_never_text_that_looks_like_one(log):
    stream = FakeTTY()
    log.addHandler(ProgressBarHandler(stream=stream))
    state = ProgressState("simulating 00|0000-0191", "explanations", 5, 12, 0.25, float("inf"))
    assert str(state) == "simulating 00|0000-0191, explanations: 5/12 (42%), 0.2/s, ETA inf s"
    log.info(str(state))  # the same text without its state: a plain line
    (line,) = screen(stream.getvalue())
    assert line.endswith(" - INFO - " + str(state))
    log_reporter(log.info)(state)
    assert screen(stream.getvalue())[-1] == "simulating 00|0000-0191 [####------] 42% 5/12 explanations 0.2/s ETA inf s"


RUN = f"""
import json, sys
from dagster import Definitions, asset, instance_for_test
from neuron_assets.stages.timing import Progress, log_reporter
from neuron_assets.progress import with_progress_bar

@asset
def counted(context) -> None:
    context.log.info("starting")
    progress = Progress(log_reporter(context.log.info), 4, {WHAT!r}, {UNIT!r}, every=0.0)
    for _ in range(4):
        progress.advance()
    context.log.info("finished")

job = with_progress_bar(Definitions(assets=[counted])).resolve_implicit_global_asset_job_def()
with instance_for_test() as instance:
    quiet = {{"loggers": {{"console": {{"config": {{"log_level": "INFO"}}}}}}}}
    result = job.execute_in_process(instance=instance, run_config=quiet)
    print(json.dumps([e.message for e in instance.all_logs(result.run_id) if "windows:" in (e.message or "")]))
"""


def env(**settings) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "COLUMNS": "200",
            **{f"NEURON_ASSETS_{name}": str(value) for name, value in settings.items()}}


def run_in_terminal(argv: list[str], environ: dict, stdout=None) -> tuple[str, bytes | None]:
    """Run `argv` with stderr (and stdout, unless `stdout` is subprocess.PIPE) on a pseudo-terminal:
    (what the terminal received, the piped stdout)."""
    master, slave = pty.openpty()
    process = subprocess.Popen(argv, stdout=slave if stdout is None else stdout, stderr=slave, env=environ)
    os.close(slave)
    output = b""
    while True:
        try:
            chunk = os.read(master, 4096)
        except OSError:  # EIO: every end of the slave is closed
            break
        if not chunk:
            break
        output += chunk
    os.close(master)
    piped, _ = process.communicate(timeout=300)
    assert process.returncode == 0, output.decode(errors="replace")
    return output.decode(), piped


def run_with_stderr_on(terminal: bool) -> tuple[str, list[str]]:
    """RUN in a fresh process, its stderr a pseudo-terminal or a pipe: (stderr, the run log's Progress lines)."""
    if not terminal:
        done = subprocess.run([sys.executable, "-c", RUN], capture_output=True, text=True, env=env(), timeout=120)
        assert done.returncode == 0, done.stderr
        return done.stderr, json.loads(done.stdout)
    stderr, stdout = run_in_terminal([sys.executable, "-c", RUN], env(), stdout=subprocess.PIPE)
    return stderr, json.loads(stdout)


@pytest.mark.parametrize("terminal", [True, False], ids=["tty", "pipe"])
def test_runs_in_process_draw_the_bar_on_a_terminal_and_keep_the_run_log(terminal):
    """Through Dagster, in a process of its own: in a step, Dagster's compute log capture has put
    stderr on a file that `tail` copies to the terminal, so the console logger must decide at the
    start of the run that stderr is a terminal, and the bar reaches it through the tail."""
    stderr, logged = run_with_stderr_on(terminal)
    # the run log (the UI's) holds every Progress line either way
    assert len(logged) == 4 and logged[-1].startswith(f"{WHAT}, {UNIT}: 4/4 (100%)")
    shown = screen(stderr)
    assert [line.rsplit(" - ", 1)[1] for line in shown if line.endswith(("starting", "finished"))] == \
        ["starting", "finished"]
    bars = [line for line in shown if BAR.fullmatch(line)]
    plain = [line for line in shown if f"{WHAT}, {UNIT}: " in line]
    if terminal:
        assert len(bars) == 1 and BAR.fullmatch(bars[0])["pct"] == "100", stderr
        assert plain == [] and stderr.count("\r") > 4  # drawn in place, not as lines
    else:
        assert "\r" not in stderr and bars == []
        assert [re.search(r"windows: (\d)/4", line)[1] for line in plain] == ["1", "2", "3", "4"]


def test_demo_draws_progress_bars_on_a_terminal(tmp_path):
    """The real `neuron-assets demo` (one layer of a tiny random model: about 10 s) on a pseudo-terminal."""
    from dagster import DagsterInstance
    from pipeline import write_corpus
    from tiny_models import build_tiny_model

    model = build_tiny_model("gpt2", tmp_path / "model", n_layers=2, max_positions=4096)
    settings = dict(MODEL=model, EXPLAINER_MODEL=model, SIMULATOR_MODEL=model,
                    CORPUS=write_corpus(tmp_path / "corpus.jsonl"),
                    STORAGE=tmp_path / "data", CACHE=tmp_path / "cache", MAX_WINDOWS=120, SEQ_LEN=16, SHARDS=2,
                    NEURONS="first:2", TOP_RECORDS=20, RANDOM_RECORDS=15, REVISION="off", DETECTION="off",
                    DEVICE="cpu", WORKERS=1, LAYERS="0")
    environ = {**env(**settings), "DAGSTER_HOME": str(tmp_path / "dagster_home")}
    # no --layers: the demo's default, the first two layers in force (here the one of NEURON_ASSETS_LAYERS)
    output, _ = run_in_terminal([sys.executable, "-m", "neuron_assets.cli", "demo"], environ)
    shown = screen(output)
    assert "layers 00; shards 00-31" in shown, output
    done = re.compile(r"(?P<what>.+) \[#{10}\] 100% (?P<n>\d+)/(?P=n) (?P<unit>\w+) [0-9.]+/s ETA 0 s")
    bars = {m["what"]: (m["n"], m["unit"]) for m in map(done.fullmatch, shown) if m}
    assert bars["forward pass, layers 00..00"] == ("120", "windows"), output
    assert bars["explaining layer 00 shard 00-31"] == ("2", "units")
    assert bars["simulating 00|00-31"][1] == "explanations"
    assert not [line for line in shown if re.search(r": \d+/\d+ \(\d+%\), ", line)]  # no plain Progress lines
    assert not [line for line in shown if "[#" in line and " - dagster - " in line]  # no bar mixed into a line
    assert any(line.startswith("done in ") for line in shown)
    # the run log, as the UI shows it, still holds the Progress messages
    with DagsterInstance.from_config(str(tmp_path / "dagster_home")) as instance:
        logged = [e.message for run in instance.get_runs() for e in instance.all_logs(run.run_id)]
    assert "forward pass, layers 00..00, windows: 120/120 (100%)" in " ".join(m or "" for m in logged)


class Captured(Exception):
    pass


def test_refresh_installs_the_progress_bar(monkeypatch, tmp_path):
    """`neuron-assets refresh` hands definitions with the progress console logger to its runs
    (stopped there: what it then runs is test_staleness' business)."""
    from tiny_models import build_tiny_model

    import neuron_assets.cli as cli
    import neuron_assets.refresh as refresh

    model = build_tiny_model("gpt2", tmp_path / "model", n_layers=2)
    for name, value in {"MODEL": model, "STORAGE": tmp_path / "data", "CACHE": tmp_path / "cache",
                        "EXPLAINER_MODEL": model, "SIMULATOR_MODEL": model}.items():
        monkeypatch.setenv(f"NEURON_ASSETS_{name}", str(value))
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster_home"))
    seen = []

    def capture(defs, *args, **kwargs):
        seen.append(defs.resolve_implicit_global_asset_job_def().loggers["console"])
        raise Captured

    monkeypatch.setattr(refresh, "refresh", capture)
    with pytest.raises(Captured):
        cli.main(["refresh"])
    assert seen == [progress_console_logger]
