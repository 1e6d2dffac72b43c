"""Sparse coders' latents as the units (NEURON_ASSETS_UNITS): tiny coders in sparsify's and SAELens'
layouts (tests/coders.py) with planted latents that fire on known words, read by a tiny GPT-2 whose
embedding marks those words; the whole graph on its defaults, explained and simulated by the oracle
server; what a retrained coder makes stale; and every kind of bad units folder, refused before any run."""

import json
import shutil
from dataclasses import replace

import numpy as np
import polars as pl
import pytest
import torch
from coders import DEAD, HOOKPOINTS, N_LATENTS, write_planted_coders
from oracle_server import OracleServer
from pipeline import in_memory_instance, remote, tiny_settings
from tiny_models import build_token_neuron_model, word_fires

from neuron_assets.definitions import build_definitions
from neuron_assets.graph import shape_of
from neuron_assets.refresh import observe_sources, stale_partitions
from neuron_assets.resources.coders import CoderError, CoderWeights, encode
from neuron_assets.resources.corpus import token_windows
from neuron_assets.resources.storage import TableStorage
from neuron_assets.runs import materialize_runs, shard_keys
from neuron_assets.settings import SettingsError
from neuron_assets.stages.explain import OUTPUT_TOKENS

WORDS = [" the", " is", " to"]
LAYERS = ("00", "01", "02")
SHARD = "0-7"


def quiet(_):
    pass


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("units")
    model, _ = build_token_neuron_model(tmp / "model", WORDS, n_layers=3)
    with OracleServer() as server:
        settings = remote(tiny_settings(model, tmp, shards=1, neurons="list:0,1,2,6", revision="on",
                                        control="shuffled", detection="on", embedding="on", output_variants="on"),
                          server)
        settings = replace(settings, simulation_method="json")
        from transformers import AutoTokenizer

        documents = [(str(i), json.loads(line)["text"])
                     for i, line in enumerate((tmp / "corpus.jsonl").read_text().splitlines())]
        cut = token_windows(AutoTokenizer.from_pretrained(model), documents, settings.seq_len, settings.max_windows)
        units = write_planted_coders(model, np.stack(cut["token_ids"]), WORDS, tmp / "units")
        settings = replace(settings, units=str(units))
        with in_memory_instance() as instance:
            defs = build_definitions(settings)
            materialize_runs(defs, instance, shape_of(defs).demo_runs(LAYERS, shard_keys(defs)), log=quiet)
            yield settings, defs, instance, cut["tokens"], tmp


def test_the_layers_are_those_of_the_coders_and_the_shards_split_their_latents(world):
    settings, defs, *_ = world
    partitions = defs.resolve_assets_def("scores").partitions_def
    assert partitions.get_partitions_def_for_dimension("layer").get_partition_keys() == list(LAYERS)
    assert partitions.get_partitions_def_for_dimension("shard").get_partition_keys() == [SHARD]
    narrower = build_definitions(replace(settings, layers="1-2", shards=2))
    partitions = narrower.resolve_assets_def("scores").partitions_def
    assert partitions.get_partitions_def_for_dimension("layer").get_partition_keys() == ["01", "02"]
    assert partitions.get_partitions_def_for_dimension("shard").get_partition_keys() == ["0-3", "4-7"]


def test_planted_latents_top_records_explanations_and_scores_find_their_words(world):
    settings, _, _, tokens, _ = world
    storage = TableStorage(root=settings.storage)
    for layer in LAYERS:
        records = storage.read("neuron_records", layer, "records").filter(pl.col("kind") == "top")
        for latent, word in enumerate(WORDS):
            for seq_id, acts in records.filter(pl.col("unit") == latent).select("seq_id", "activations").iter_rows():
                peak = int(np.argmax(acts))
                assert word_fires(tokens[seq_id], word)[peak], (layer, latent, tokens[seq_id][peak])
        stats = storage.read("neuron_records", layer, "stats")
        assert stats.height == N_LATENTS
        assert stats.filter(pl.col("unit").is_in(list(DEAD)))["activation_frequency"].to_list() == [0.0, 0.0]
        promoted = storage.read("explanations", f"{layer}|{SHARD}", "output_tokens").filter(pl.col("rank") == 0)
        assert promoted.sort("unit")["token"].to_list()[: len(WORDS)] == WORDS, layer
        explanations = storage.read("explanations", f"{layer}|{SHARD}")
        for latent, word in enumerate(WORDS):
            for variant in ("token_baseline", OUTPUT_TOKENS):
                text = explanations.filter((pl.col("unit") == latent) & (pl.col("variant") == variant))["text"][0]
                assert f'"{word.strip()}"' in text, (layer, variant, text)
        dead = explanations.filter(pl.col("unit") == DEAD[0])
        assert dead["text"].is_null().all() and dead["error"].is_not_null().all()
        scores = storage.read("scores", f"{layer}|{SHARD}")
        baseline = scores.filter((pl.col("variant") == "token_baseline") & pl.col("unit").is_in([0, 1, 2]))
        assert (baseline["score_all"] > 0.9).all(), baseline
        summary = storage.read("layer_summary", layer).row(0, named=True)
        assert summary["hookpoint"] == HOOKPOINTS[int(layer)]
        assert summary["n_dead_units"] == len(DEAD) and summary["dead_units"] == list(DEAD)


def test_a_retrained_coder_makes_exactly_its_layer_stale(world):
    settings, defs, instance, _, tmp = world
    observe_sources(defs, instance, log=quiet)
    assert stale_partitions(defs, instance, include_missing=False) == []
    weights = tmp / "units" / HOOKPOINTS[1] / "sae.safetensors"
    original = weights.read_bytes()
    from safetensors.torch import load_file, save_file

    tensors = load_file(weights)
    tensors["encoder.weight"][4] += 0.5  # one more training step, say
    save_file(tensors, weights)
    try:
        observe_sources(defs, instance, log=quiet)
        stale = stale_partitions(defs, instance, include_missing=False)
        assert {(asset, partition) for asset, partition, _ in stale} == {("neuron_records", "01")}
        assert all("subject_model_weights" in cause for _, _, cause in stale)
    finally:
        weights.write_bytes(original)
        observe_sources(defs, instance, log=quiet)
    assert stale_partitions(defs, instance, include_missing=False) == []


def test_encoding_follows_each_activation_by_hand():
    x = torch.tensor([[1.0, 2.0]])
    encoder = torch.tensor([[1.0, 0.0, 1.0, -1.0], [0.0, 1.0, 1.0, 1.0]])  # [d_in, latents]
    bias = torch.tensor([0.0, -1.2, -2.0, 0.5])
    decoder_bias = torch.tensor([0.5, 0.5])
    # x - b_dec = [0.5, 1.5]; pre = [0.5, 0.3, 0.0, 1.5]
    cases = {("standard", 0, None): [0.5, 0.3, 0.0, 1.5],
             ("jumprelu", 0, torch.tensor([0.6, 0.2, 0.0, 1.0])): [0.0, 0.3, 0.0, 1.5],
             ("topk", 1, None): [0.0, 0.0, 0.0, 1.5],
             ("groupmax", 2, None): [0.5, 0.0, 0.0, 1.5]}  # the best of [0.5, 0.3] and of [0.0, 1.5]
    for (activation, k, threshold), expected in cases.items():
        coder = _coder(activation, k)
        acts = encode(CoderWeights(coder, encoder, bias, torch.zeros(4, 2), decoder_bias, threshold), x)
        assert acts[0].tolist() == pytest.approx(expected), activation


def _coder(activation: str, k: int):
    from pathlib import Path

    from neuron_assets.resources.coders import Coder

    return Coder(Path("."), "saelens", "blocks.0.hook_resid_post", "h.0", "output", 0, 2, 4, activation, k,
                 subtract_decoder_bias=True, scale_by_decoder_norm=False, kind="sae")


def _copy_units(world, name: str):
    settings, _, _, _, tmp = world
    target = tmp / name
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(tmp / "units", target)
    return settings, target


def _edit_json(file, **changes):
    config = json.loads(file.read_text())
    config.update(changes)
    file.write_text(json.dumps(config))


def _narrower(folder, width: int = 48):
    """Make the sparsify coder in `folder` one trained on a model of another width (files consistent)."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(folder / "sae.safetensors")
    save_file({name: (t[..., :width] if name != "encoder.bias" else t).contiguous() for name, t in tensors.items()},
              folder / "sae.safetensors")
    _edit_json(folder / "cfg.json", d_in=width)


BAD = [
    # what is wrong, how to make it, the file named, words of the message
    ("d_in", lambda u: _narrower(u / "h.0"), "h.0/cfg.json", "d_in is 48"),
    ("activation", lambda u: _edit_json(u / "h.0" / "cfg.json", activation="relu"), "h.0/cfg.json",
     "activation 'relu'"),
    ("architecture", lambda u: _edit_json(u / "resid_post_2" / "cfg.json", architecture="gated"),
     "resid_post_2/cfg.json", "architecture 'gated'"),
    ("not a module", lambda u: (u / "h.1.mlp").rename(u / "h.1.mlp_out"), "h.1.mlp_out",
     "'h.1.mlp_out' is not a module"),
    ("hook name", lambda u: _edit_json(u / "resid_post_2" / "cfg.json", metadata={"hook_name": "blocks.2.attn.hook_z"}),
     "resid_post_2/cfg.json", "hook name 'blocks.2.attn.hook_z'"),
    ("missing config", lambda u: (u / "h.0" / "cfg.json").unlink(), "h.0/cfg.json", "is missing"),
    ("missing weights", lambda u: (u / "h.0" / "sae.safetensors").unlink(), "h.0", "holds neither"),
    ("truncated weights", lambda u: (u / "h.0" / "sae.safetensors").write_bytes(
        (u / "h.0" / "sae.safetensors").read_bytes()[:-100]), "h.0/sae.safetensors", "is truncated"),
    ("config not JSON", lambda u: (u / "h.0" / "cfg.json").write_text("{'d_in': 64"), "h.0/cfg.json", "is not JSON"),
    ("shape", lambda u: _edit_json(u / "h.0" / "cfg.json", num_latents=16), "h.0/sae.safetensors",
     "has shape [8, 64]"),
    ("two coders in a layer", lambda u: shutil.copytree(u / "h.0", u / "h.0.mlp"), "h.0.mlp",
     "second coder for layer 0"),
]


@pytest.mark.parametrize("name,damage,named,words", BAD, ids=[b[0] for b in BAD])
def test_a_bad_units_folder_is_refused_naming_the_file_before_any_run(world, name, damage, named, words):
    settings, target = _copy_units(world, "bad")
    damage(target)
    with pytest.raises(CoderError) as error:
        build_definitions(replace(settings, units=str(target), storage=str(target.parent / "bad-data")))
    message = str(error.value)
    assert "NEURON_ASSETS_UNITS" in message and str(target / named) in message and words in message, message
    assert not (target.parent / "bad-data").exists()


def test_a_folder_without_coders_a_missing_folder_and_layers_without_coders_are_refused(world):
    settings, target = _copy_units(world, "empty")
    for sub in target.iterdir():
        shutil.rmtree(sub)
    with pytest.raises(CoderError, match="holds no coder folder"):
        build_definitions(replace(settings, units=str(target)))
    with pytest.raises(CoderError, match="no such folder"):
        build_definitions(replace(settings, units=str(target / "nowhere")))
    settings, target = _copy_units(world, "two")
    shutil.rmtree(target / "resid_post_2")
    with pytest.raises(SettingsError, match=r"names layer\(s\) \[2\] without a coder"):
        build_definitions(replace(settings, units=str(target), layers="1-2"))


def test_coders_in_an_s3_folder_are_read_like_local_ones(world, s3, tmp_path):
    from safetensors.torch import load_file, save_file

    from neuron_assets.definitions import subject_model_of

    settings, *_, tmp = world
    s3.put(str(tmp / "units"), "study/units", recursive=True)
    local = subject_model_of(settings)
    remote_units = subject_model_of(replace(settings, units="s3://study/units", cache=str(tmp_path / "cache")))
    assert remote_units.unit_shape() == local.unit_shape()
    layers = [0, 1, 2]
    before = remote_units.layer_hashes(layers)
    assert before == local.layer_hashes(layers)
    tensors = load_file(tmp / "units" / HOOKPOINTS[1] / "sae.safetensors")
    tensors["W_dec"][5] *= 2  # retrained on the bucket
    save_file(tensors, tmp_path / "retrained.safetensors")
    s3.put(str(tmp_path / "retrained.safetensors"), f"study/units/{HOOKPOINTS[1]}/sae.safetensors")
    after = remote_units.layer_hashes(layers)
    assert [after[layer] != before[layer] for layer in layers] == [False, True, False]
    assert len(list((tmp_path / "cache" / "units").iterdir())) == 2  # a fresh copy for the new files


def test_tables_written_before_the_unit_rename_read_under_the_new_names(tmp_path):
    storage = TableStorage(root=str(tmp_path))
    storage.write(pl.DataFrame({"neuron": [3, 4], "variant": ["llm_shuffled", "llm"], "donor_neuron": [4, None]}),
                  "scores", "00|0-7")
    assert storage.read("scores", "00|0-7").columns == ["unit", "variant", "donor_unit"]
    picked = storage.read("scores", "00|0-7", columns=["unit", "donor_unit"])
    assert picked.columns == ["unit", "donor_unit"] and picked["donor_unit"].to_list() == [4, None]


def test_the_demo_runs_the_first_two_layers_in_force_or_those_asked_for():
    from neuron_assets.cli import demo_layers

    keys = ["03", "05", "07"]
    assert demo_layers(None, keys) == ["03", "05"]
    assert demo_layers(["7", "03"], keys) == ["07", "03"]
    with pytest.raises(SettingsError, match=r"--layers 4: not among the layers in force \(03, 05, 07"):
        demo_layers(["4"], keys)
    with pytest.raises(SettingsError, match="takes layer numbers or keys"):
        demo_layers(["x"], keys)


def test_the_settings_command_lists_the_coders_and_names_a_bad_one(world, monkeypatch, capsys):
    from types import SimpleNamespace

    from neuron_assets.cli import show_settings

    settings, *_ = world
    for name, value in settings.environment().items():
        monkeypatch.setenv(name, value)
    show_settings(SimpleNamespace(markdown=False))
    out = capsys.readouterr().out
    assert ("units: 8 latents per layer, in layers 00: sae h.0 (sparsify, 8 latents, topk); "
            "01: transcoder h.1.mlp (sparsify, 8 latents, groupmax); "
            "02: sae blocks.2.hook_resid_post (saelens, 8 latents, jumprelu)") in out
    _, target = _copy_units(world, "for-settings")
    _edit_json(target / "h.0" / "cfg.json", activation="relu")
    monkeypatch.setenv("NEURON_ASSETS_UNITS", str(target))
    with pytest.raises(SystemExit, match="activation 'relu' is not one sparsify writes"):
        show_settings(SimpleNamespace(markdown=False))
