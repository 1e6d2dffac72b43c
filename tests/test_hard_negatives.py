"""Hard negatives on a tiny random-weight GPT-2: neuron_records for 2 layers in one run, checked
against the stored top records, corpus_tokens and a fresh forward pass."""

from collections import Counter

import numpy as np
import polars as pl
import torch
from dagster import AssetKey
from pipeline import in_memory_instance, tiny_settings
from tiny_models import build_tiny_model

from neuron_assets.runs import materialize_runs
from neuron_assets.definitions import build_definitions
from neuron_assets.resources.models import load_causal_lm, neuron_module
from neuron_assets.resources.storage import TableStorage

LAYERS = ("00", "01")


def expected_top_tokens(top: pl.DataFrame, token_ids: np.ndarray) -> dict[int, set[int]]:
    """Per neuron, the up to 3 most frequent tokens at the argmax of its top records (ties: higher rank)."""
    out = {}
    for (neuron,), group in top.sort("rank").group_by("unit", maintain_order=True):
        acts = [np.asarray(a) for a in group["activations"]]
        if max(a.max() for a in acts) <= 0:
            out[neuron] = set()
            continue
        at_max = [int(token_ids[s, int(np.argmax(a))]) for s, a in zip(group["seq_id"], acts)]
        counts = Counter(at_max)
        out[neuron] = set(sorted(counts, key=lambda t: (-counts[t], at_max.index(t)))[:3])
    return out


def layer_activations(model, layer: int, windows: np.ndarray) -> np.ndarray:
    captured = []
    handle = neuron_module(model, layer).register_forward_pre_hook(lambda m, a: captured.append(a[0]))
    with torch.inference_mode():
        model(input_ids=torch.tensor(windows, dtype=torch.long))
    handle.remove()
    return captured[0].float().numpy()  # [windows, T, N]


def test_hard_negatives_hold_top_tokens_stay_quiet_and_match_a_fresh_forward_pass(tmp_path):
    model_dir = build_tiny_model("gpt2", tmp_path / "model", n_layers=2, max_positions=4096)
    settings = tiny_settings(model_dir, tmp_path, max_windows=200)
    defs = build_definitions(settings)
    with in_memory_instance() as instance:
        materialize_runs(defs, instance, [(("corpus_documents", "corpus_tokens"), None),
                                          (("neuron_records",), LAYERS)], log=lambda _: None)
        metadata = {r.partition_key: r.asset_materialization.metadata
                    for r in instance.fetch_materializations(AssetKey("neuron_records"), limit=10).records}
    storage = TableStorage(root=settings.storage)
    tokens = storage.read("corpus_tokens")
    assert tokens["seq_id"].to_list() == list(range(tokens.height))
    token_ids = np.stack(tokens["token_ids"].to_numpy())
    model, _ = load_causal_lm(settings.model, settings.cache, "cpu")
    for key in LAYERS:
        records = storage.read("neuron_records", key, "records")
        n_neurons = records["unit"].n_unique()
        top = records.filter(pl.col("kind") == "top")
        hard = records.filter(pl.col("kind") == "hard_negative").sort("unit", "rank")
        assert hard.height > 0
        counts = hard.group_by("unit").agg(pl.len(), pl.col("rank").sort())
        assert counts["len"].max() <= 10
        assert all(ranks.to_list() == list(range(len(ranks))) for ranks in counts["rank"])
        top_tokens = expected_top_tokens(top, token_ids)
        peaks = top.group_by("unit").agg(pl.col("activations").list.max().max().alias("peak"))
        peak = dict(zip(peaks["unit"], peaks["peak"]))
        top_windows = {n: set(g["seq_id"]) for (n,), g in top.group_by("unit")}
        windows = np.unique(hard["seq_id"].to_numpy())
        fresh = layer_activations(model, int(key), token_ids[windows])
        row_of = {int(s): i for i, s in enumerate(windows)}
        for neuron, seq_id, acts in hard.select("unit", "seq_id", "activations").iter_rows():
            acts = np.asarray(acts, dtype=np.float32)
            assert set(token_ids[seq_id].tolist()) & top_tokens[neuron]
            assert seq_id not in top_windows[neuron]
            assert acts.max() < 0.1 * peak[neuron]
            np.testing.assert_allclose(acts, fresh[row_of[seq_id], :, neuron], rtol=1e-4, atol=1e-5)
        meta = metadata[key]
        assert meta["hard negatives: neurons with >= 1"].value == counts.height
        per_neuron = np.zeros(n_neurons)
        per_neuron[counts["unit"].to_numpy()] = counts["len"].to_numpy()
        assert meta["hard negatives: median per neuron"].value == float(np.median(per_neuron))
        assert 0 < meta["hard negatives: windows in second pass"].value <= tokens.height
    print({k: {m: v.value for m, v in metadata[k].items() if "hard" in m} for k in LAYERS})
