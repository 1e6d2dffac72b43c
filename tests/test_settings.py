"""The settings declaration: every Settings field is declared once, parsed by its declaration, and
every bad value is reported at once, one line each naming the variable."""

from dataclasses import fields
from pathlib import Path

import pytest

from neuron_assets.settings import SETTINGS, Settings, markdown_table


def test_every_field_is_declared_once_and_the_defaults_parse():
    declared = [s.field for s in SETTINGS if s.field in {f.name for f in fields(Settings)}]
    assert sorted(declared) == sorted(f.name for f in fields(Settings))
    assert len({s.env for s in SETTINGS}) == len(SETTINGS)
    settings = Settings.from_env({})
    assert (settings.seq_len, settings.control, settings.workers) == (64, "shuffled", 1)
    assert Path(settings.storage).is_absolute() and Path(settings.prices).is_file()
    assert Settings.from_env(settings.environment()) == settings  # what a step process reads back


def test_every_bad_value_is_one_line_naming_the_variable():
    with pytest.raises(ValueError) as e:
        Settings.from_env({"NEURON_ASSETS_SEQ_LEN": "1", "NEURON_ASSETS_SHARDS": "many",
                           "NEURON_ASSETS_CONTROL": "random", "NEURON_ASSETS_SEED": "-1"})
    lines = str(e.value).splitlines()
    assert lines == ["NEURON_ASSETS_SEQ_LEN=1 must be at least 2", "NEURON_ASSETS_SHARDS='many' is not a whole number",
                     "NEURON_ASSETS_SEED=-1 must be at least 0", "NEURON_ASSETS_CONTROL='random': use 'shuffled' or 'none'"]


def test_the_markdown_table_has_a_row_per_setting_with_its_effect():
    rows = markdown_table().splitlines()[2:]
    assert len(rows) == len(SETTINGS)
    seed = next(r for r in rows if r.startswith("| `NEURON_ASSETS_SEED`"))
    assert "version of `sampling`" in seed
    assert "| none |" in next(r for r in rows if r.startswith("| `NEURON_ASSETS_WORKERS`"))
