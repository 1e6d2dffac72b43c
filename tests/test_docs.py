"""The documentation names what the code declares: every column of every table the stages write
appears in the table list of docs/method.md, under its table; every settings source is named
where the README and docs/operations.md list them."""

import re
from pathlib import Path

import pytest

from neuron_assets.assets.corpus import DOCUMENT_SCHEMA, TOKENS_SCHEMA
from neuron_assets.settings import SOURCES
from neuron_assets.stages import capture, detect, embed, explain, revise, score, simulate

REPO = Path(__file__).resolve().parents[1]
METHOD = REPO / "docs" / "method.md"
TABLES = {
    "corpus_documents": DOCUMENT_SCHEMA,
    "corpus_tokens": TOKENS_SCHEMA,
    "neuron_records": {**capture.RECORDS_SCHEMA, **capture.STATS_SCHEMA},
    "explanations": {**explain.SCHEMA, **explain.OUTPUT_TOKENS_SCHEMA},
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


@pytest.mark.parametrize("page, lead", [("README.md", "the settings sources (group `settings`"),
                                        ("docs/operations.md", "the settings sources (group `settings` in the UI)")])
def test_every_settings_source_is_listed(page, lead):
    text = (REPO / page).read_text()
    paragraph = text[text.index(lead):].split("\n\n", 1)[0]
    missing = [source for source in SOURCES if f"`{source}`" not in paragraph]
    assert not missing, f"{page} does not list the settings sources {missing}"
