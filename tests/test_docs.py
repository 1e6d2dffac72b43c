"""The documentation names what the code declares: every column of every table the stages write
appears in the table list of docs/method.md, under its table."""

import re
from pathlib import Path

import pytest

from neuron_assets.assets.corpus import DOCUMENT_SCHEMA, TOKENS_SCHEMA
from neuron_assets.stages import capture, detect, embed, explain, revise, score, simulate

METHOD = Path(__file__).resolve().parents[1] / "docs" / "method.md"
TABLES = {
    "corpus_documents": DOCUMENT_SCHEMA,
    "corpus_tokens": TOKENS_SCHEMA,
    "neuron_records": {**capture.RECORDS_SCHEMA, **capture.STATS_SCHEMA},
    "explanations": explain.SCHEMA,
    "revised_explanations": {c: t for c, t in revise.REVISED_SCHEMA.items() if c not in explain.SCHEMA},
    "simulations": simulate.SCHEMA,
    "scores": score.SCHEMA,
    "detection_scores": detect.SCHEMA,
    "embedding_scores": embed.SCHEMA,
}


def documented_columns(table: str) -> set[str]:
    """The words of the table's row in the docs' table list (| asset | partitions | columns |)."""
    rows = [line for line in METHOD.read_text().splitlines() if line.startswith(f"| {table} |")]
    assert len(rows) == 1, f"docs/method.md has {len(rows)} rows for {table}"
    return set(re.findall(r"[a-z_]+", rows[0].split("|")[3]))


@pytest.mark.parametrize("table", TABLES)
def test_every_column_is_documented(table):
    missing = set(TABLES[table]) - documented_columns(table)
    assert not missing, f"docs/method.md does not name {sorted(missing)} of {table}"
