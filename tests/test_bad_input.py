"""Bad input: a clear error naming the input and the fix, and nothing already computed is lost."""

import json

import pytest
from dagster import AssetKey
from pipeline import in_memory_instance, tiny_settings
from tiny_models import build_tiny_model

from neuron_assets.runs import materialize_runs
from neuron_assets.definitions import build_definitions
from neuron_assets.resources.corpus import CorpusError, CorpusSource
from neuron_assets.resources.models import ModelNotFoundError, resolve_model, shape_of
from neuron_assets.resources.storage import TableStorage
from neuron_assets.settings import Settings, parse_layers


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return build_tiny_model("gpt2", tmp_path_factory.mktemp("model") / "gpt2", n_layers=2, max_positions=32)


def test_unknown_model_says_how_to_give_a_local_path(tmp_path):
    with pytest.raises(ModelNotFoundError, match="NEURON_ASSETS_MODEL=/path/to/model-directory"):
        resolve_model("some-org/not-on-this-machine", str(tmp_path))
    with pytest.raises(ModelNotFoundError, match="no such GGUF file"):
        resolve_model(str(tmp_path / "missing.gguf"), str(tmp_path))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFoundError, match="without config.json"):
        resolve_model(str(tmp_path / "empty"), str(tmp_path))


def test_unsupported_architecture_lists_the_supported_ones():
    from transformers import BertConfig

    with pytest.raises(ValueError, match=r"'bert' is not supported; supported: .*gpt2.*gpt_neox.*llama"):
        shape_of(BertConfig())


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("missing.jsonl", None, "does not exist"),
        ("empty.txt", b"   \n", "contains no text"),
        ("notext.jsonl", b'{"body": "hello"}\n', "no field 'text'.*NEURON_ASSETS_TEXT_COLUMN"),
        ("latin1.txt", "caf\u00e9 cr\u00e8me".encode("latin-1"), r"not valid UTF-8 \(byte 3.*iconv"),
        ("table.csv", b"a,b\n", "unsupported file type"),
    ],
)
def test_bad_corpus_files_name_the_file_and_the_fix(tmp_path, name, content, message):
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(CorpusError, match=message):
        CorpusSource(source=str(path)).documents()


def test_parquet_corpus_without_the_text_column(tmp_path):
    import polars as pl

    pl.DataFrame({"body": ["some text"]}).write_parquet(tmp_path / "c.parquet")
    with pytest.raises(CorpusError, match=r"no column 'text' \(columns: body\)"):
        CorpusSource(source=str(tmp_path / "c.parquet")).documents()
    assert CorpusSource(source=str(tmp_path / "c.parquet"), text_column="body").documents()[0][1] == "some text"


def test_layers_outside_the_model_and_bad_numbers(monkeypatch):
    with pytest.raises(ValueError, match=r"layer\(s\) \[30, 31\] outside the model, which has layers 0-29"):
        parse_layers("28-31", 30)
    monkeypatch.setenv("NEURON_ASSETS_SEQ_LEN", "1")
    with pytest.raises(ValueError, match="NEURON_ASSETS_SEQ_LEN=1 must be at least 2"):
        Settings.from_env()
    monkeypatch.setenv("NEURON_ASSETS_SEQ_LEN", "64")
    monkeypatch.setenv("NEURON_ASSETS_SHARDS", "100")
    with pytest.raises(ValueError, match="NEURON_ASSETS_SHARDS=100 must be between 1 and 99"):
        Settings.from_env()


def test_window_longer_than_the_context_fails_and_keeps_the_documents(tiny_model, tmp_path):
    good = tiny_settings(tiny_model, tmp_path, seq_len=16)
    with in_memory_instance() as instance:
        materialize_runs(build_definitions(good), instance, [(("corpus_documents", "corpus_tokens"), None)], log=print)
        storage = TableStorage(root=good.storage)
        before = storage.path("corpus_tokens").read_bytes()
        too_long = tiny_settings(tiny_model, tmp_path, seq_len=33)
        with pytest.raises(SystemExit, match="NEURON_ASSETS_SEQ_LEN=33 must be between 2 and the subject model's context of 32"):
            materialize_runs(build_definitions(too_long), instance, [(("corpus_tokens",), None)], log=print)
        assert storage.path("corpus_tokens").read_bytes() == before  # the earlier windows are intact
        assert instance.get_latest_materialization_event(AssetKey("corpus_documents")) is not None


def test_text_that_is_not_utf8_inside_a_jsonl_corpus(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_bytes(json.dumps({"text": "ok"}).encode() + b"\n\xff\xfe\n")
    with pytest.raises(CorpusError, match="not valid UTF-8"):
        CorpusSource(source=str(path)).documents()
