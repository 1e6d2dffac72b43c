"""What the LLMs give back, as typed values shared by the backends (resources/) and the stages:
an `Answer` to a chat conversation, a `Simulation` of one sequence, and the `Usage` both carry.
A row of a table takes their fields by name (`usage.row()`)."""

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class Usage:
    """What a request cost: tokens, US dollars (0 for a local model or a cached answer), and
    whether the answer came from the response cache."""

    tokens_in: int = 0
    tokens_out: int = 0
    cost_usd: float = 0.0
    cache_hit: bool = False

    def __add__(self, other: "Usage") -> "Usage":
        """Tokens and cost add up; the sum is a cache hit only where both parts are."""
        return Usage(self.tokens_in + other.tokens_in, self.tokens_out + other.tokens_out,
                     self.cost_usd + other.cost_usd, self.cache_hit and other.cache_hit)

    def row(self) -> dict:
        """The table columns of this usage."""
        return {"tokens_in": self.tokens_in, "tokens_out": self.tokens_out, "cost_usd": self.cost_usd,
                "cache_hit": self.cache_hit}


def total(usages) -> Usage:
    """The sum of several usages (cache hit only where every one is; none is no cost and a miss)."""
    usages = list(usages)
    if not usages:
        return Usage()
    out = usages[0]
    for usage in usages[1:]:
        out = out + usage
    return out


@dataclass(frozen=True)
class Answer:
    """The text an LLM wrote for one conversation, or the error that kept it from answering."""

    text: str
    usage: Usage = field(default_factory=Usage)
    error: str | None = None

    @classmethod
    def failed(cls, error: str) -> "Answer":
        return cls("", Usage(), error)


@dataclass(frozen=True)
class Simulation:
    """The simulator's expected activation (0-10) per token of one sequence: NaN at the `n_failed`
    tokens where it gave no usable value; `expected` is None when the whole sequence failed."""

    expected: np.ndarray | None
    n_failed: int
    error: str | None = None
    usage: Usage = field(default_factory=Usage)

    @classmethod
    def failed(cls, error: str, n_tokens: int = 0) -> "Simulation":
        """A sequence that could not be simulated: no values, its error, every token failed."""
        return cls(None, n_tokens, error)


@dataclass(frozen=True)
class Verdict:
    """A judge's answer on one batch of excerpts: a 0/1 decision per excerpt (None where it gave
    none), p("1") per excerpt where known (renormalised over "0" and "1"), why its answer could not
    be read (`unreadable`: its excerpts are unanswered) or the error that kept it from answering."""

    decisions: list[int | None]
    p_one: list[float | None]
    usage: Usage = field(default_factory=Usage)
    unreadable: str | None = None
    error: str | None = None

    @classmethod
    def failed(cls, error: str, n: int) -> "Verdict":
        """A batch of n excerpts the judge could not be asked about: all unanswered, its error."""
        return cls([None] * n, [None] * n, Usage(), None, error)


class SetupError(RuntimeError):
    """A setting to fix (an endpoint without the model named): the step fails with this one message,
    where a failed request is its unit's error row."""


def attempt(what: str, call, *args):
    """`(call(*args), None)`, or `(None, "<what>: <type>: <message>")` where the call raises:
    a failed call becomes its units' error rows, never a failed shard. A `SetupError` is a setting
    to fix, not a unit's failure: it passes through and the step fails with it."""
    try:
        return call(*args), None
    except SetupError:
        raise
    except Exception as exc:
        return None, f"{what}: {type(exc).__name__}: {exc}"
