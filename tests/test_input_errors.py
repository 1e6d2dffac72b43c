"""Errors that name the input (issue 16, item 4) and files written with the process's umask (6a).

Each bad input fails with one clear error naming the file (and the setting that chose it) and
what is wrong, and the tables already stored are byte for byte what they were.
"""

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from pipeline import in_memory_instance, tiny_settings
from tiny_models import build_tiny_model, build_tokenizer

from neuron_assets.definitions import build_definitions
from neuron_assets.resources.corpus import CorpusError, CorpusSource
from neuron_assets.resources.files import StorageError, write_atomic
from neuron_assets.resources.models import ModelFileError, layer_weight_hashes, load_causal_lm, resolve_model
from neuron_assets.resources.storage import TableStorage
from neuron_assets.runs import materialize_runs


def _stored(root) -> dict[str, str]:
    """sha256 of every file under a storage root, by relative path."""
    root = Path(root)
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def computed(tmp_path_factory):
    """A tiny model's corpus documents and token windows, materialized once: (settings, instance)."""
    tmp = tmp_path_factory.mktemp("computed")
    model = build_tiny_model("gpt2", tmp / "gpt2", n_layers=2, max_positions=32)
    settings = tiny_settings(model, tmp)
    with in_memory_instance() as instance:
        materialize_runs(build_definitions(settings), instance, [(("corpus_documents", "corpus_tokens"), None)],
                         log=lambda _: None)
        yield settings, instance


def _materialize_fails(settings, instance, assets: tuple[str, ...], message: str) -> str:
    """Materialize `assets` with bad settings: it must fail with `message` (literal text) and change
    no stored table."""
    before = _stored(settings.storage)
    assert before, "nothing stored to protect"
    # A GGUF file is checked when the definitions are built (its shape needs the converted copy);
    # a damaged model directory or corpus fails inside the step.
    with pytest.raises((SystemExit, ModelFileError), match=re.escape(message)) as failure:
        materialize_runs(build_definitions(settings), instance, [(assets, None)], log=lambda _: None)
    assert _stored(settings.storage) == before
    return str(failure.value)


# --- model files ------------------------------------------------------------------------------------

def build_tiny_gguf(path: Path, drop: tuple[str, ...] = ()) -> Path:
    """A one-layer Llama GGUF file with random float32 weights (all but `drop`) and the tiny
    byte-level BPE tokenizer: it converts in about a second."""
    from gguf import GGUFWriter, TokenType

    tokenizer = build_tokenizer(path.parent / f"{path.stem}-tokenizer", vocab_size=300)
    tokens = sorted(tokenizer.get_vocab(), key=tokenizer.get_vocab().get)
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    hidden, ff, heads, kv_heads, vocab = 32, 16, 4, 2, len(tokens)
    writer = GGUFWriter(path, "llama")
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([TokenType.CONTROL if t in tokenizer.all_special_tokens else TokenType.NORMAL
                            for t in tokens])
    writer.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in merges])
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_block_count(1)
    writer.add_context_length(64)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(ff)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(hidden // heads)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(vocab)
    kv = kv_heads * hidden // heads
    shapes = {"token_embd.weight": (vocab, hidden), "output_norm.weight": (hidden,),
              "blk.0.attn_norm.weight": (hidden,), "blk.0.ffn_norm.weight": (hidden,),
              "blk.0.attn_q.weight": (hidden, hidden), "blk.0.attn_k.weight": (kv, hidden),
              "blk.0.attn_v.weight": (kv, hidden), "blk.0.attn_output.weight": (hidden, hidden),
              "blk.0.ffn_gate.weight": (ff, hidden), "blk.0.ffn_up.weight": (ff, hidden),
              "blk.0.ffn_down.weight": (hidden, ff)}
    rng = np.random.default_rng(0)
    for name, shape in shapes.items():
        if name not in drop:
            writer.add_tensor(name, rng.standard_normal(shape).astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _truncated_safetensors(good: Path, tmp: Path) -> tuple[Path, str]:
    bad = shutil.copytree(good, tmp / "model")
    weights = bad / "model.safetensors"
    size = weights.stat().st_size
    os.truncate(weights, size - 1000)
    return bad, f"{weights} is truncated: it has {size - 1000:,} bytes, its header describes {size:,}"


def _safetensors_missing_a_tensor(good: Path, tmp: Path) -> tuple[Path, str]:
    from safetensors.torch import load_file, save_file

    bad = shutil.copytree(good, tmp / "model")
    state = load_file(bad / "model.safetensors")
    del state["transformer.h.1.mlp.c_fc.weight"]
    save_file(state, bad / "model.safetensors", metadata={"format": "pt"})
    return bad, (f"{bad}/model.safetensors lacks 1 tensor(s) of the gpt2 model (they would be random): "
                 "transformer.h.1.mlp.c_fc.weight")


def _not_a_gguf(good: Path, tmp: Path) -> tuple[Path, str]:
    bad = tmp / "model.gguf"
    bad.write_bytes(b"<html><body>404 Not Found</body></html>")
    return bad, f"{bad} is not a GGUF file: it starts with b'<htm', not b'GGUF'"


def _truncated_gguf(good: Path, tmp: Path) -> tuple[Path, str]:
    bad = build_tiny_gguf(tmp / "model.gguf")
    size = bad.stat().st_size
    os.truncate(bad, size - 100)
    return bad, f"{bad} is truncated: it has {size - 100:,} bytes, but its contents need at least {size:,}"


def _gguf_missing_a_tensor(good: Path, tmp: Path) -> tuple[Path, str]:
    bad = build_tiny_gguf(tmp / "model.gguf", drop=("blk.0.ffn_up.weight",))
    return bad, f"{bad} lacks 1 tensor(s) of the llama model (they would be random): model.layers.0.mlp.up_proj.weight"


@pytest.mark.parametrize("damage", [_truncated_safetensors, _safetensors_missing_a_tensor, _not_a_gguf,
                                    _truncated_gguf, _gguf_missing_a_tensor])
def test_a_damaged_model_file_is_named_and_the_tables_are_kept(computed, tmp_path, damage):
    settings, instance = computed
    bad, what = damage(Path(settings.model), tmp_path)
    message = _materialize_fails(replace(settings, model=str(bad)), instance, ("corpus_tokens",),
                                 f"NEURON_ASSETS_MODEL='{bad}': {what}")
    assert "Copy or download it again, or set NEURON_ASSETS_MODEL to another model" in message
    assert "reshape" not in message


def test_the_weight_hashes_name_a_truncated_file(computed, tmp_path):
    settings, _ = computed
    bad, what = _truncated_safetensors(Path(settings.model), tmp_path)
    with pytest.raises(ModelFileError, match=re.escape(f"NEURON_ASSETS_MODEL='{bad}': {what}")):
        layer_weight_hashes(str(bad), settings.cache, [0])


def test_a_damaged_converted_copy_says_to_delete_it(tmp_path):
    """A GGUF file converts (its checks pass); when its converted copy is damaged later, the
    error says to delete the copy, not to fetch the GGUF file again."""
    gguf = build_tiny_gguf(tmp_path / "model.gguf")
    copy = Path(resolve_model(str(gguf), str(tmp_path / "cache")))
    weights = copy / "model.safetensors"
    os.truncate(weights, weights.stat().st_size - 10)
    with pytest.raises(ModelFileError, match=re.escape(
            f"NEURON_ASSETS_EXPLAINER_MODEL='{gguf}': {weights} is truncated: it has ") + ".*"
            + re.escape(f"Delete {copy}, the copy converted from the GGUF file: the next run converts it again.")):
        load_causal_lm(str(gguf), str(tmp_path / "cache"), "cpu", setting="NEURON_ASSETS_EXPLAINER_MODEL")


# --- storage ----------------------------------------------------------------------------------------

FULL_DISK = textwrap.dedent("""
    import json, resource, sys
    from pathlib import Path
    import numpy as np, polars as pl
    from neuron_assets.resources.files import StorageError
    from neuron_assets.resources.storage import TableStorage

    root, mode = Path(sys.argv[1]), sys.argv[2]
    storage = TableStorage(root=str(root / "data"))
    storage.write(pl.DataFrame({"x": [1, 2, 3]}), "scores", "00|0")
    before = storage.path("scores", "00|0").read_bytes()
    if mode == "rlimit":  # a write past the limit fails with EFBIG (Python ignores SIGXFSZ)
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    big = pl.DataFrame({"x": np.random.default_rng(0).standard_normal(200_000)})  # ~1.6 MB, incompressible
    try:
        storage.write(big, "scores", "00|0")
        error = None
    except StorageError as e:
        error = str(e)
    print(json.dumps({"error": error, "kept": storage.path("scores", "00|0").read_bytes() == before,
                      "files": sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())}))
""")


def _on_tmpfs(mount: Path, size: str, command: list[str]) -> list[str]:
    """`command`, run with a tmpfs of `size` at `mount`, in its own user and mount namespaces."""
    return ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
            f'mount -t tmpfs -o size={size} tmpfs "{mount}" && exec "$@"', "sh", *command]


def _tmpfs_available() -> bool:
    return bool(shutil.which("unshare")) and subprocess.run(
        _on_tmpfs(Path("/tmp"), "64k", ["true"]), capture_output=True).returncode == 0


def _run_script(tmp_path: Path, script: str, args: list[str], tmpfs: tuple[Path, str] | None = None) -> dict:
    """Run `script`, which prints one JSON line last, in a new process (on a `tmpfs` (mount, size))."""
    path = tmp_path / "script.py"
    path.write_text(script)
    command = [sys.executable, str(path), *args]
    done = subprocess.run(_on_tmpfs(*tmpfs, command) if tmpfs else command, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])


@pytest.mark.parametrize("mode", ["tmpfs", "rlimit"])
def test_a_full_disk_names_the_path_the_setting_and_the_free_space(tmp_path, mode):
    """tmpfs: a real ENOSPC on a 512 KiB file system mounted in a private mount namespace (where
    user namespaces allow it); rlimit: EFBIG from RLIMIT_FSIZE, which any Linux allows."""
    root = tmp_path / "disk"
    root.mkdir()
    if mode == "tmpfs" and not _tmpfs_available():
        pytest.skip("cannot mount a tmpfs in a user namespace here; the rlimit case covers the message")
    result = _run_script(tmp_path, FULL_DISK, [str(root), mode], (root, "512k") if mode == "tmpfs" else None)
    target = root / "data" / "scores" / "00" / "0" / "data.parquet"
    assert result["error"].startswith(f"cannot write {target} (1.5 MiB): ")
    if mode == "tmpfs":
        assert "No space left on device; " in result["error"]
        assert f" KiB free on the file system of {target.parent}. " in result["error"]
        assert result["error"].endswith("Free some space there, or set NEURON_ASSETS_STORAGE to a location with room.")
    else:
        assert "File too large; the file is larger than this process (ulimit -f)" in result["error"]
        assert result["error"].endswith("Raise the limit, or set NEURON_ASSETS_STORAGE to another file system.")
    assert result["kept"]  # the old table is whole and unchanged
    assert result["files"] == ["data/scores/00/0/data.parquet"]  # no part-written temp file left


CONVERSION = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    from neuron_assets.resources.files import StorageError
    from neuron_assets.resources.models import resolve_model

    gguf, cache = sys.argv[1], Path(sys.argv[2])
    try:
        resolve_model(gguf, str(cache))
        error = None
    except StorageError as e:
        error = str(e)
    print(json.dumps({"error": error, "left": sorted(str(p.relative_to(cache)) for p in cache.rglob("*"))}))
""")


def test_a_conversion_on_a_full_disk_names_the_cache_setting(tmp_path):
    """The safetensors writer reports a full disk without an errno; the message is the same."""
    if not _tmpfs_available():
        pytest.skip("cannot mount a tmpfs in a user namespace here")
    gguf = build_tiny_gguf(tmp_path / "model.gguf")
    cache = tmp_path / "cache"
    cache.mkdir()
    result = _run_script(tmp_path, CONVERSION, [str(gguf), str(cache)], (cache, "16k"))
    assert result["error"].startswith(f"cannot write {cache}/models/model-")
    assert f" KiB free on the file system of {cache}/models. " in result["error"]
    assert result["error"].endswith("Free some space there, or set NEURON_ASSETS_CACHE to a location with room.")
    assert result["left"] == ["models"]  # the part written is gone


def test_a_damaged_stored_table_is_named_with_how_to_rebuild_it(tmp_path):
    storage = TableStorage(root=str(tmp_path / "data"))
    storage.write(pl.DataFrame({"x": [1, 2, 3]}), "scores", "00|1")
    target = storage.path("scores", "00|1")
    os.truncate(target.path, 20)
    message = (re.escape(f"the table {target} under NEURON_ASSETS_STORAGE is not readable Parquet (") + ".*"
               + re.escape("); delete it and materialize partition 00|1 again "
                           "(dagster asset materialize --select scores --partition '00|1')"))
    with pytest.raises(StorageError, match=message):
        storage.read("scores", "00|1")


# --- corpus -----------------------------------------------------------------------------------------

def test_json_lines_are_split_on_newline_only(tmp_path):
    """U+2028, U+2029 and U+0085 are line breaks to str.splitlines() but plain characters inside a
    JSON string; a bad record is reported at its own line."""
    texts = [f"record {i}: a\u2028b\u2029c\u0085d" for i in range(79)]
    path = tmp_path / "c.jsonl"
    path.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts))
    documents = CorpusSource(source=str(path)).documents()
    assert [text for _, text in documents] == texts
    assert documents[-1][0] == "c.jsonl:79"
    with path.open("a") as f:
        f.write('{"text": "unfinished\n')
    with pytest.raises(CorpusError, match=rf"corpus file {path} line 80 is not JSON: Unterminated string"):
        CorpusSource(source=str(path)).documents()


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("c.jsonl", b'{"text": "a"}\n\n{"text": 42}\n', r"line 3: field 'text' holds int 42, not a string"),
        ("c.jsonl", b'{"text": "a"}\r\n{"text": "b"}\r\n{"text": "\xff"}\r\n',
         r"is not valid UTF-8 \(byte 40, line 3: "),
        ("c.parquet", b"PAR1 not really", r"is not readable Parquet"),
    ],
)
def test_corpus_errors_name_the_file_and_the_record(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(CorpusError, match=re.escape(f"corpus file {path} ") + message):
        CorpusSource(source=str(path)).documents()


def test_a_bad_corpus_record_fails_the_step_and_keeps_the_tables(computed, tmp_path):
    settings, instance = computed
    path = tmp_path / "corpus.jsonl"
    path.write_text('{"text": "fine"}\n{"text": "fine"}\n{"body": "no text"}\n')
    _materialize_fails(replace(settings, corpus=str(path)), instance, ("corpus_documents", "corpus_tokens"),
                       f"corpus file {path} line 3 has no field 'text'; set NEURON_ASSETS_TEXT_COLUMN")


# --- file modes -------------------------------------------------------------------------------------

@pytest.mark.parametrize("umask", [0o022, 0o027, 0o002])
def test_files_get_the_process_umask(tmp_path, umask):
    storage = TableStorage(root=str(tmp_path / "data"))
    previous = os.umask(umask)
    try:
        storage.write(pl.DataFrame({"x": [1]}), "scores", "00|0")
        target = Path(storage.path("scores", "00|0").path)
        first = target.stat().st_mode & 0o777
        target.chmod(0o600)
        write_atomic(storage.path("scores", "00|0"), b"replaced")  # a new file replaces the old one
        replaced = target.stat().st_mode & 0o777
    finally:
        os.umask(previous)
    assert (first, replaced) == (0o666 & ~umask, 0o666 & ~umask)
    assert target.parent.stat().st_mode & 0o777 == 0o777 & ~umask
