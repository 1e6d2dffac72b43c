"""The persistent, content-addressed response cache that every LLM backend shares.

An entry is one JSON file `<root>/<key[:2]>/<key>.json` holding a model's answer to one request;
the key is the sha256 of the canonical JSON of everything that decides the answer (backend, model
identity, the request and its parameters). Entries are written atomically (a reader, or a rerun
after a crash, sees no entry or the whole one) and only for answers the model actually gave; an
unreadable entry is a miss and is written again. The root is a local path or any fsspec URL
(s3://). No Dagster import.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable

from upath import UPath

from neuron_assets.resources.files import StorageError, write_atomic

log = logging.getLogger(__name__)

CACHE_FORMAT = 1


def canonical(obj) -> str:
    """One JSON text per value: keys sorted, no spaces, non-ASCII kept."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


class ResponseCache:
    """Answers under `root` (None: no cache, every read misses and writes are dropped). `scrub`
    edits an entry's text before it is written (the remote backend removes its API key)."""

    def __init__(self, root: str | None, scrub: Callable[[str], str] = lambda text: text):
        self.root = UPath(root) if root else None
        self.scrub = scrub

    @staticmethod
    def key(request: dict) -> str:
        """sha256 (64 hex) of the canonical request."""
        return hashlib.sha256(canonical(request).encode("utf-8")).hexdigest()

    def path(self, key: str) -> UPath:
        return self.root / key[:2] / f"{key}.json"

    def get(self, key: str) -> dict | None:
        """The stored response, or None: no cache, no entry, or an entry that cannot be read."""
        if self.root is None:
            return None
        path = self.path(key)
        try:
            if not path.exists():
                return None
            return json.loads(path.read_text(encoding="utf-8"))["response"]
        except FileNotFoundError:
            return None
        except (ValueError, KeyError, TypeError) as error:
            log.warning("ignoring unreadable LLM cache entry %s: %s", path, error)
            return None

    def put(self, key: str, response: dict, **about) -> None:
        """Store `response` under `key`, with `about` (backend, model, the request) beside it for
        whoever reads the file. A cache that cannot be written is logged, never raised: the answer
        in hand (maybe paid for) must still reach its table."""
        if self.root is None:
            return
        record = {"format": CACHE_FORMAT, "key": key, **about, "response": response, "created": time.time()}
        text = self.scrub(json.dumps(record, ensure_ascii=False, default=str))
        path = self.path(key)
        try:
            write_atomic(path, text.encode("utf-8"))
        except (OSError, StorageError) as error:
            log.warning("could not write LLM cache entry %s: %s", path, error)
