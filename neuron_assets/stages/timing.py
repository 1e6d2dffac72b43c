"""Progress lines and model time of a stage, plain Python: a stage logs through any `log(str)`
(a step's `context.log.info`), and the console's progress bar reads the same line back."""

import re
import time
from collections.abc import Callable
from contextlib import contextmanager

# A progress line: written by `progress_line` (assets.common.Progress), read back by `parse_progress`.
PROGRESS = re.compile(r"^(?P<what>.+): (?P<done>\d+)/(?P<total>\d+) \((?P<pct>\d+)%\), "
                      r"(?P<rate>[0-9.]+|inf|nan)/s, ETA (?P<eta>[0-9]+|inf|nan) s$")


def progress_line(what: str, done: int, total: int, rate: float, eta: float) -> str:
    """`what: done/total (pct%), rate/s, ETA eta s`, the line `parse_progress` reads."""
    return f"{what}: {done}/{total} ({100 * done / max(total, 1):.0f}%), {rate:.1f}/s, ETA {eta:.0f} s"


def parse_progress(message: str) -> dict | None:
    """The fields of a Progress message (what, done, total, pct, rate, eta), or None for another message."""
    match = PROGRESS.match(message.strip())
    if match is None:
        return None
    fields = match.groupdict()
    return {"what": fields["what"], "done": int(fields["done"]), "total": int(fields["total"]),
            "pct": int(fields["pct"]), "rate": float(fields["rate"]), "eta": fields["eta"]}


class Progress:
    """Logs 'what: done/total, rate, ETA' at most every `every` seconds (and at the end)."""

    def __init__(self, log: Callable[[str], None], total: int, what: str, every: float = 10.0):
        self.log, self.total, self.what, self.every = log, total, what, every
        self.start = self.last = time.monotonic()
        self.done = 0

    def advance(self, n: int = 1) -> None:
        self.done += n
        now = time.monotonic()
        if now - self.last >= self.every or self.done >= self.total:
            self.last = now
            rate = self.done / max(now - self.start, 1e-9)
            eta = (self.total - self.done) / rate if rate > 0 else float("inf")
            self.log(progress_line(self.what, self.done, self.total, rate, eta))

    @property
    def seconds(self) -> float:
        return time.monotonic() - self.start


class ModelClock:
    """Seconds spent inside the models (forward passes, generation, simulation): what is left of
    a step's time is orchestration and I/O, reported beside it in the metadata."""

    def __init__(self):
        self.seconds = 0.0

    @contextmanager
    def running(self):
        start = time.monotonic()
        try:
            yield
        finally:
            self.seconds += time.monotonic() - start

    def timed(self, batches):
        """Yield from `batches`, counting the time spent producing each item."""
        batches = iter(batches)
        while True:
            with self.running():
                item = next(batches, None)
            if item is None:
                return
            yield item
