"""Per-unit work that waits on an LLM endpoint, several units at once, results in input order.

A remote LLM's requests spend their time waiting on the network, so threads keep the endpoint
busy; the endpoint's own limits (resources/openai_client.py: requests in flight, requests and
tokens per minute) decide how many requests really go out at once. A local model gets one worker:
it batches its work itself and is not shared between threads."""

import threading
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T, R = TypeVar("T"), TypeVar("R")


def in_order(fn: Callable[[T], R], items: Iterable[T], workers: int) -> list[R]:
    """[fn(item) for item in items], up to `workers` calls at once; the results in the order of `items`
    whatever order they finish in, so a table is the same as a serial run's. Once a call raises, no
    other starts (the first exception is raised), as in the serial loop."""
    items = list(items)
    if workers <= 1 or len(items) <= 1:
        return [fn(item) for item in items]
    failed = threading.Event()

    def call(item: T) -> R:
        if failed.is_set():
            raise RuntimeError("not started: an earlier call failed")
        try:
            return fn(item)
        except BaseException:
            failed.set()
            raise

    pool = ThreadPoolExecutor(max_workers=min(workers, len(items)))
    try:
        return list(pool.map(call, items))
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
