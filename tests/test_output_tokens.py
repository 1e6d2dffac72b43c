"""Output-centric explanations: the tokens a unit's output direction promotes through the final
norm and the unembedding, found on tiny models with a planted neuron, and the `output_tokens` and
`llm_output` variants simulated, scored and controlled like every other
(NEURON_ASSETS_OUTPUT_VARIANTS=on)."""

import numpy as np
import polars as pl
import pytest
import torch
from pipeline import in_memory_instance, run_graph, tiny_settings
from tiny_models import build_tiny_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from neuron_assets.method.output import output_tokens_explanation, promoted_tokens_note
from neuron_assets.method.prompts import explainer_messages, load_fewshot
from neuron_assets.resources.subject_model import SubjectModel
from neuron_assets.resources.study import PROMPTS
from neuron_assets.stages.explain import LLM_OUTPUT, OUTPUT_TOKENS, OUTPUT_TOKENS_SCHEMA

PLANTED_NEURON, WORD = 3, " class"


def plant(path, arch: str) -> int:
    """Point neuron 3 of layer 0 at the unembedding row of WORD (divided by the final norm's weight,
    so that the norm gives that row's direction back); return WORD's token id."""
    model = AutoModelForCausalLM.from_pretrained(path)
    token = AutoTokenizer.from_pretrained(path)(WORD, add_special_tokens=False)["input_ids"]
    assert len(token) == 1, f"{WORD!r} is not one token of the tiny tokenizer"
    row = model.get_output_embeddings().weight[token[0]]
    with torch.no_grad():
        if arch == "gpt2":  # Conv1D: [neurons, model width]; LayerNorm centres, so the row is centred too
            norm = model.transformer.ln_f
            model.transformer.h[0].mlp.c_proj.weight[PLANTED_NEURON] = 10 * (row - row.mean()) / norm.weight
        else:  # Linear: [model width, neurons]
            norm = model.model.norm
            model.model.layers[0].mlp.down_proj.weight[:, PLANTED_NEURON] = 10 * row / norm.weight
    model.save_pretrained(path)
    return token[0]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_a_planted_neuron_promotes_its_token_first(arch, tmp_path):
    path = build_tiny_model(arch, tmp_path / "model", n_layers=2, max_positions=4096)
    token = plant(path, arch)
    subject = SubjectModel(model=str(path), cache=str(tmp_path / "cache"), device="cpu")
    every = list(range(subject.shape().n_neurons))
    ids, logits = subject.promoted_tokens(0, every, 5, chunk=16)  # chunks smaller than the layer: all neurons all the same
    assert ids.shape == logits.shape == (len(every), 5)
    assert ids[PLANTED_NEURON, 0] == token
    some, some_logits = subject.promoted_tokens(0, [PLANTED_NEURON, 0], 5)  # only the units asked for, in that order
    assert (some == ids[[PLANTED_NEURON, 0]]).all() and some_logits == pytest.approx(logits[[PLANTED_NEURON, 0]], rel=1e-5)
    assert (logits[:, :-1] >= logits[:, 1:]).all()  # best first
    # the same logits as the full model computes from that direction as its last hidden state
    model, _ = subject.load()
    with torch.no_grad():
        projection = model.get_submodule("transformer.h.0.mlp.c_proj" if arch == "gpt2" else "model.layers.0.mlp.down_proj")
        direction = projection.weight[PLANTED_NEURON] if arch == "gpt2" else projection.weight[:, PLANTED_NEURON]
        norm = model.transformer.ln_f if arch == "gpt2" else model.model.norm
        expected = torch.topk(model.get_output_embeddings()(norm(direction)), 5)
    assert ids[PLANTED_NEURON].tolist() == expected.indices.tolist()
    assert logits[PLANTED_NEURON] == pytest.approx(expected.values.numpy(), rel=1e-5)


def test_the_output_phrase_names_distinct_printable_tokens_best_first():
    assert output_tokens_explanation([" class", "class", " ", "def", "\n", ' "x"']) == \
        'text followed by "class", "def" or "\\"x\\""'
    assert output_tokens_explanation([" only"]) == 'text followed by "only"'
    assert output_tokens_explanation(["a", "b", "c", "d", "e", "f"], n_tokens=2) == 'text followed by "a" or "b"'
    assert output_tokens_explanation([" ", "\n"]) is None


def test_the_explainer_reads_the_promoted_tokens_after_the_records_and_before_the_closing_phrase():
    note = promoted_tokens_note([" class", "class", "def"])
    assert note == 'When this neuron fires, it pushes the model towards predicting "class" or "def" next.'
    assert promoted_tokens_note([" "]) == ""
    fewshot = load_fewshot(f"{PROMPTS}/explainer_fewshot.json")
    records = [(["a", " cat"], np.array([0.0, 1.0]))]
    plain = explainer_messages(records, fewshot, prefill=True)
    with_note = explainer_messages(records, fewshot, prefill=True, note=note)
    assert with_note[:-2] == plain[:-2] and with_note[-1] == plain[-1]  # only the target's user turn differs
    before, closing = plain[-2]["content"].rsplit("\n", 1)
    assert with_note[-2]["content"] == f"{before}\n{note}\n{closing}"


def test_the_output_tokens_variant_is_simulated_scored_and_controlled(tmp_path):
    path = build_tiny_model("llama", tmp_path / "model", n_layers=1, max_positions=4096)
    plant(path, "llama")
    settings = tiny_settings(path, tmp_path, shards=1, neurons=f"list:0,{PLANTED_NEURON}", output_variants="on",
                             control="shuffled")
    with in_memory_instance() as instance:
        storage = run_graph(settings, instance, ("00",))
    # the units explained, from the explanations step; the capture computed none
    promoted = storage.read("explanations", "00|00-63", "output_tokens")
    assert dict(promoted.schema) == OUTPUT_TOKENS_SCHEMA and promoted["unit"].unique().sort().to_list() == [0, PLANTED_NEURON]
    assert promoted.filter((pl.col("unit") == PLANTED_NEURON) & (pl.col("rank") == 0))["token"].to_list() == [WORD]
    assert not storage.path("neuron_records", "00", "output_tokens").exists()
    explanations = storage.read("explanations", "00|00-63").filter(pl.col("variant") == OUTPUT_TOKENS)
    assert explanations["unit"].to_list() == [0, PLANTED_NEURON]
    planted = explanations.filter(pl.col("unit") == PLANTED_NEURON)
    assert planted["text"][0].startswith('text followed by "class"') and planted["explainer_model"][0] == "none"
    asked = storage.read("explanations", "00|00-63").filter(pl.col("variant") == LLM_OUTPUT)
    assert asked["unit"].to_list() == [0, PLANTED_NEURON] and (asked["explainer_model"] != "none").all()
    scores = storage.read("scores", "00|00-63")
    variants = {OUTPUT_TOKENS, LLM_OUTPUT}
    assert variants | {f"{v}_shuffled" for v in variants} <= set(scores["variant"])
    assert scores.filter(pl.col("variant") == OUTPUT_TOKENS)["error"].is_null().all()
    assert variants <= set(storage.read("model_summary")["variant"])
