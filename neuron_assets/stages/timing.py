"""Progress and model time of a stage, plain Python: a stage reports ProgressState values to any
callable; an asset logs them as run log lines that carry the state itself, which the console's
progress bar draws (progress.py) without reading the text back."""

import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass

# The attribute of a log record that carries its ProgressState (logging's `extra`), for the console bar.
PROGRESS_ATTR = "neuron_assets_progress"


@dataclass(frozen=True)
class ProgressState:
    """How far a long piece of work is: `done` of `total` `unit` (neurons, windows) at `rate` per
    second, `eta` seconds left. Its text is the line of the run log."""

    what: str
    unit: str
    done: int
    total: int
    rate: float
    eta: float

    @property
    def percent(self) -> int:
        return round(100 * self.done / max(self.total, 1))

    @property
    def final(self) -> bool:
        return self.done >= self.total

    def __str__(self) -> str:
        return (f"{self.what}, {self.unit}: {self.done}/{self.total} ({self.percent}%), {self.rate:.1f}/s, "
                f"ETA {self.eta:.0f} s")


def log_reporter(info: Callable[..., None]) -> Callable[[ProgressState], None]:
    """A progress reporter for a logging method (`logger.info`, a step's `context.log.info`): each
    state is logged as its line, with the state itself in the record for the console's bar."""
    return lambda state: info(str(state), extra={PROGRESS_ATTR: state})


class Progress:
    """Reports a ProgressState to `report` at most every `every` seconds (and at the end)."""

    def __init__(self, report: Callable[[ProgressState], None], total: int, what: str, unit: str,
                 every: float = 10.0):
        self.report, self.total, self.what, self.unit, self.every = report, total, what, unit, every
        self.start = self.last = time.monotonic()
        self.done = 0
        self.lock = threading.Lock()  # units done by several threads (stages/concurrent.py) advance it

    def advance(self, n: int = 1) -> None:
        with self.lock:
            self.done += n
            now = time.monotonic()
            if now - self.last < self.every and self.done < self.total:
                return
            self.last = now
            rate = self.done / max(now - self.start, 1e-9)
            eta = (self.total - self.done) / rate if rate > 0 else float("inf")
            state = ProgressState(self.what, self.unit, self.done, self.total, rate, eta)
        self.report(state)

    @property
    def seconds(self) -> float:
        return time.monotonic() - self.start


class ModelClock:
    """Seconds spent inside the models (forward passes, generation, simulation): what is left of
    a step's time is orchestration and I/O, reported beside it in the metadata. Where several
    threads wait on the models at once, a second counts once: the clock runs while any of them does."""

    def __init__(self):
        self.seconds = 0.0
        self.lock = threading.Lock()
        self.inside = 0
        self.since = 0.0

    @contextmanager
    def running(self):
        with self.lock:
            if self.inside == 0:
                self.since = time.monotonic()
            self.inside += 1
        try:
            yield
        finally:
            with self.lock:
                self.inside -= 1
                if self.inside == 0:
                    self.seconds += time.monotonic() - self.since

    def timed(self, batches):
        """Yield from `batches`, counting the time spent producing each item."""
        batches = iter(batches)
        while True:
            with self.running():
                item = next(batches, None)
            if item is None:
                return
            yield item
