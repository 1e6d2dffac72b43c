"""Where the corpus comes from, and how it becomes fixed-length token windows."""

import json
import re

import numpy as np
import polars as pl
from dagster import ConfigurableResource
from upath import UPath

from neuron_assets.resources.files import check_s3_root

SUFFIXES = (".txt", ".jsonl", ".parquet")


class CorpusError(ValueError):
    pass


def python_docs() -> list[tuple[str, str]]:
    """The standard library's English reference topics (pydoc_data), one document per section.

    Present on every machine with Python; sorted, so the order and content hash are stable.
    """
    from pydoc_data.topics import topics

    documents = []
    for topic in sorted(topics):
        # A section starts at a title line underlined with *, =, - or ~.
        sections = re.split(r"\n(?=[^\n]+\n[*=\-~^]{3,}\n)", topics[topic])
        for i, text in enumerate(sections):
            if text.strip():
                documents.append((f"{topic}#{i}", text.strip()))
    return documents


def _decode(data: bytes, name: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise CorpusError(
            f"corpus file {name} is not valid UTF-8 (byte {e.start}, line {line}: {data[e.start:e.start + 4]!r}); "
            "re-encode it, e.g. `iconv -f latin1 -t utf-8 in.txt > out.txt`"
        ) from None


def _read_jsonl(data: bytes, name: str, short: str, text_column: str) -> list[tuple[str, str]]:
    r"""One document per line. Records are separated by "\n" only, as JSON Lines defines: other
    characters that str.splitlines() breaks at (U+2028, U+0085, ...) may appear inside strings."""
    documents = []
    for number, line in enumerate(_decode(data, name).split("\n"), start=1):
        if not line.strip():
            continue
        where = f"corpus file {name} line {number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise CorpusError(f"{where} is not JSON: {e.msg} (column {e.colno})") from None
        if not isinstance(row, dict) or text_column not in row:
            raise CorpusError(
                f"{where} has no field {text_column!r}; set NEURON_ASSETS_TEXT_COLUMN to the field that holds the text"
            )
        text = row[text_column]
        if text is None:  # a record without text, as a null in a Parquet column
            continue
        if not isinstance(text, str):
            raise CorpusError(f"{where}: field {text_column!r} holds {type(text).__name__} {json.dumps(text)[:40]}, "
                              "not a string; set NEURON_ASSETS_TEXT_COLUMN to the field that holds the text")
        documents.append((f"{short}:{number}", text))
    return documents


def _read_file(path: UPath, text_column: str) -> list[tuple[str, str]]:
    name = str(path)
    if path.suffix == ".txt":
        return [(path.name, _decode(path.read_bytes(), name))]
    if path.suffix == ".jsonl":
        return _read_jsonl(path.read_bytes(), name, path.name, text_column)
    try:
        table = pl.read_parquet(path.read_bytes())
    except pl.exceptions.ComputeError as e:
        raise CorpusError(f"corpus file {name} is not readable Parquet ({e}); write it again or remove it") from None
    if text_column not in table.columns:
        raise CorpusError(
            f"corpus file {name} has no column {text_column!r} (columns: {', '.join(table.columns)}); "
            "set NEURON_ASSETS_TEXT_COLUMN to the column that holds the text"
        )
    column = table.get_column(text_column)
    if column.dtype not in (pl.String, pl.Null):
        raise CorpusError(f"corpus file {name}: column {text_column!r} holds {column.dtype}, not text; "
                          "set NEURON_ASSETS_TEXT_COLUMN to the column that holds the text")
    texts = column.to_list()
    return [(f"{path.name}:{i}", t) for i, t in enumerate(texts) if t is not None]


class CorpusSource(ConfigurableResource):
    """The embedded Python docs, or local / s3:// .txt, .jsonl, .parquet files (or a directory)."""

    source: str = "python-docs"
    text_column: str = "text"

    def documents(self) -> list[tuple[str, str]]:
        if self.source == "python-docs":
            return python_docs()
        root = UPath(self.source)
        check_s3_root(self.source, "NEURON_ASSETS_CORPUS")
        if not root.exists():
            raise CorpusError(f"NEURON_ASSETS_CORPUS={self.source!r} does not exist")
        if root.is_dir():
            files = sorted((p for p in root.rglob("*") if p.suffix in SUFFIXES), key=str)
            if not files:
                raise CorpusError(f"NEURON_ASSETS_CORPUS={self.source!r} holds no {', '.join(SUFFIXES)} files")
        elif root.suffix in SUFFIXES:
            files = [root]
        else:
            raise CorpusError(
                f"NEURON_ASSETS_CORPUS={self.source!r}: unsupported file type; use {', '.join(SUFFIXES)}"
            )
        documents = [d for f in files for d in _read_file(f, self.text_column) if d[1].strip()]
        if not documents:
            raise CorpusError(f"NEURON_ASSETS_CORPUS={self.source!r} contains no text")
        return documents


def token_windows(tokenizer, documents: list[tuple[str, str]], seq_len: int, max_windows: int = 0) -> dict:
    """Cut each document's tokens into windows of exactly seq_len tokens (the short tail is dropped).

    Returns columns seq_id, doc_id, token_ids, tokens (each token decoded on its own), plus the
    number of tail tokens dropped.
    """
    columns = {"seq_id": [], "doc_id": [], "token_ids": [], "tokens": []}
    dropped = 0
    text_of: dict[int, str] = {}  # decoding is per token id, so decode each id once
    for doc_id, text in documents:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        n_full = len(ids) // seq_len
        dropped += len(ids) - n_full * seq_len
        for w in range(n_full):
            window = ids[w * seq_len : (w + 1) * seq_len]
            columns["seq_id"].append(len(columns["seq_id"]))
            columns["doc_id"].append(doc_id)
            columns["token_ids"].append(np.asarray(window, dtype=np.int32))
            for t in window:
                if t not in text_of:
                    text_of[t] = tokenizer.decode([t])
            columns["tokens"].append([text_of[t] for t in window])
            if max_windows and len(columns["seq_id"]) >= max_windows:
                return {**columns, "dropped_tokens": dropped}
    return {**columns, "dropped_tokens": dropped}
