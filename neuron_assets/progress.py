"""A progress bar on the console for runs executed in this process (`neuron-assets demo`, `refresh`).

Long steps log progress lines ("what, unit: done/total (pct%), rate/s, ETA s") that carry their
`ProgressState` in the log record (stages/timing.py, assets/common.py `progress_log`): the line is
the run log in the Dagster UI, the state is what the bar draws. On the console, Dagster prints a run's log
through its `console` logger, a fresh `logging.Logger("dagster")` per run that is *not* registered
with `logging.getLogger` (dagster._loggers.colored_console_logger): handlers added to the `dagster`
or root Python loggers never see run logs. So the bar comes as a replacement `console` logger
(`progress_console_logger`, same config: log_level, name) whose handler, `ProgressBarHandler`:

- where stderr is a TTY when the run starts, draws progress records as one bar rewritten in place
  with '\\r' (`forward pass, layers 00..02 [#####-----] 51% 848/1658 windows 84/s ETA 10 s`), ends the bar
  with a newline when done == total, and clears a half-drawn bar before any other line;
- elsewhere (CI logs, pipes), writes every record as the plain line Dagster's console logger writes.

Inside a step, Dagster's compute log capture has moved file descriptors 1 and 2 onto files that a
`tail -F` copies to the terminal: stderr is no TTY there, so the TTY test is made when the run's
logger is created, and the bar reaches the terminal through the tail, in order with everything
else the step writes.

`with_progress_bar(defs)` returns the definitions with that logger for their jobs.
"""

import logging
import shutil
import sys
import threading
import weakref

from dagster import Definitions, Field, logger

from neuron_assets.stages.timing import PROGRESS_ATTR, ProgressState

FORMAT = "%(asctime)s - %(name)s - %(levelname)s - %(message)s"  # dagster's console format
DATE_FORMAT = "%Y-%m-%d %H:%M:%S %z"
BAR_WIDTH = 10


def render_bar(state: ProgressState, width: int = BAR_WIDTH) -> str:
    """`what [#####-----] 51% 848/1658 unit 84/s ETA 10 s`."""
    filled = min(width, round(width * state.done / state.total)) if state.total else width
    rate = state.rate
    rate_text = f"{rate:.0f}" if rate >= 10 or rate != rate or rate == float("inf") else f"{rate:.1f}"
    return (f"{state.what} [{'#' * filled}{'-' * (width - filled)}] {state.percent}% {state.done}/{state.total} "
            f"{state.unit} {rate_text}/s ETA {state.eta:.0f} s")


class ProgressBarHandler(logging.Handler):
    """Progress lines as a bar rewritten in place on a TTY; every other record as a plain line,
    after clearing the bar. Not a TTY: every record as a plain line.

    `stream` defaults to sys.stderr, looked up at each record (as Dagster's console handler does).
    `tty`: whether to draw bars; by default whether the stream is a TTY at each record. Inside a
    step, Dagster's compute log capture has redirected file descriptors 1 and 2 to files that a
    `tail -F` copies to the terminal, so there stderr is never a TTY: the logger of a run decides
    when the run starts (`progress_console_logger`), and the bar reaches the terminal through the
    tail. `columns`: the width to cut bars to where the terminal's cannot be read (same reason).
    `tracebacks`: False prints an error record's message without its stack trace (`without_traceback`).
    What is drawn on a stream is shared by all handlers on it, since each run makes a new one.
    """

    # stream -> length of the bar drawn there, unterminated (weak: a stream that is gone has no bar,
    # and a new stream at its address must not inherit it)
    _drawn = weakref.WeakKeyDictionary()
    _strong: dict = {}  # the same, for streams that cannot be weakly referenced
    _lock = threading.RLock()

    def __init__(self, stream=None, level: int = logging.NOTSET, tty: bool | None = None,
                 columns: int | None = None, tracebacks: bool = True):
        super().__init__(level)
        self._stream, self._tty, self._tracebacks = stream, tty, tracebacks
        self._columns = columns or shutil.get_terminal_size((100, 24)).columns
        self._plain = logging.Formatter(FORMAT, DATE_FORMAT)
        self._colored = None

    @property
    def stream(self):
        return self._stream if self._stream is not None else sys.stderr

    def is_tty(self, stream) -> bool:
        if self._tty is not None:
            return self._tty
        isatty = getattr(stream, "isatty", None)
        try:
            return bool(isatty and isatty())
        except ValueError:  # a closed stream
            return False

    def _line_formatter(self, tty: bool) -> logging.Formatter:
        if not tty:
            return self._plain
        if self._colored is None:
            try:  # Dagster's console colours (coloredlogs is a Dagster dependency)
                import coloredlogs

                self._colored = coloredlogs.ColoredFormatter(
                    FORMAT, DATE_FORMAT, field_styles={"levelname": {"color": "blue"}, "asctime": {"color": "green"}},
                    level_styles={"debug": {}, "error": {"color": "red"}})
            except ImportError:
                self._colored = self._plain
        return self._colored

    def emit(self, record: logging.LogRecord) -> None:
        try:
            stream = self.stream
            tty = self.is_tty(stream)
            state = getattr(record, PROGRESS_ATTR, None) if tty else None
            with self._lock:
                if isinstance(state, ProgressState):
                    self._draw(stream, render_bar(state), final=state.final)
                else:
                    self._clear(stream)
                    if not self._tracebacks and record.levelno >= logging.ERROR:
                        record = logging.makeLogRecord({**record.__dict__, "msg": without_traceback(record.getMessage()),
                                                        "args": ()})
                    stream.write(self._line_formatter(tty).format(record) + "\n")
                stream.flush()
        except Exception:
            self.handleError(record)

    def _draw(self, stream, bar: str, final: bool) -> None:
        columns = shutil.get_terminal_size((self._columns, 24)).columns
        bar = bar if len(bar) < columns else bar[: columns - 2] + "…"  # a wrapped line cannot be redrawn
        padding = max(0, self._bar_length(stream) - len(bar))  # what is left of a longer bar
        stream.write("\r" + bar + " " * padding)
        if final:
            stream.write("\n")
            self._pop(stream)
        else:
            if padding:
                stream.write("\r" + bar)  # the cursor after the bar, not after the padding
            self._lengths(stream)[stream] = len(bar)

    @classmethod
    def _lengths(cls, stream) -> dict:
        """The table holding this stream's bar length: the weak one where the stream allows it."""
        try:
            weakref.ref(stream)
        except TypeError:
            return cls._strong
        return cls._drawn

    @classmethod
    def _bar_length(cls, stream) -> int:
        return cls._lengths(stream).get(stream, 0)

    @classmethod
    def _pop(cls, stream) -> int:
        return cls._lengths(stream).pop(stream, 0)

    @classmethod
    def _clear(cls, stream) -> None:
        drawn = cls._pop(stream)
        if drawn:
            stream.write("\r" + " " * drawn + "\r")

    @classmethod
    def clear(cls, stream=None) -> None:
        """Erase a half-drawn bar, e.g. before printing to the same terminal by other means."""
        stream = stream if stream is not None else sys.stderr
        with cls._lock:
            if cls._bar_length(stream):
                cls._clear(stream)
                stream.flush()


def _console_logger(tracebacks: bool):
    @logger(
        {"log_level": Field(str, is_required=False, default_value="INFO", description="The logger's threshold."),
         "name": Field(str, is_required=False, default_value="dagster", description="The name of the logger.")},
        description="Dagster's console logger, with progress drawn as a bar on a TTY"
        + ("." if tracebacks else ", and a failed step's error without its traceback."),
    )
    def console(init_context) -> logging.Logger:
        level = logging.getLevelName(init_context.logger_config["log_level"].upper())
        out = logging.Logger(init_context.logger_config["name"], level=level if isinstance(level, int) else logging.INFO)
        # Now, at the start of the run, stderr is still the terminal (if any); in the steps it is not.
        out.addHandler(ProgressBarHandler(tty=ProgressBarHandler().is_tty(sys.stderr), tracebacks=tracebacks))
        return out

    return console


progress_console_logger = _console_logger(tracebacks=False)
verbose_console_logger = _console_logger(tracebacks=True)


def without_traceback(message: str) -> str:
    """A failure message of Dagster's (header, error, 'Stack Trace:' and its frames, the causes)
    as the header and the errors alone, each once, with a hint where the traceback went."""
    out, skipping = [], False
    for line in message.splitlines():
        if line.startswith("Stack Trace:"):
            skipping = True
            continue
        if skipping and (line.startswith(" ") or not line.strip()):
            continue
        skipping = False
        if line.startswith(("dagster._core.errors.", "The above exception")) or (line.strip() and line in out):
            continue
        if line.strip() or (out and out[-1].strip()):
            out.append(line)
    if len(out) < len(message.splitlines()):
        out.append("(the traceback: neuron-assets --verbose)")
    return "\n".join(out)


def with_progress_bar(defs: Definitions, tracebacks: bool = False) -> Definitions:
    """The definitions with `progress_console_logger` (or, with `tracebacks`, one that keeps failed
    steps' tracebacks) as the `console` logger of their jobs: runs executed in this process
    (cli.materialize_runs with one worker) draw the bar. Runs in step subprocesses (workers > 1)
    rebuild the definitions from neuron_assets.definitions and keep Dagster's plain console logger."""
    console = verbose_console_logger if tracebacks else progress_console_logger
    return Definitions.merge(defs, Definitions(loggers={"console": console}))
