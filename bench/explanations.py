"""Explanation throughput of the local explainer (issue 5, target 5), side by side in one run.

On the embedded SmolLM2-135M-Instruct, real explainer conversations for N neurons: the real
few-shot prompt (resources/prompts/explainer_fewshot.json) and each neuron's 5 train top records,
computed here from a slice of the embedded corpus (the Python docs) with the asset's code
(SubjectModel, RecordSampler, split_top). The same conversations are answered three ways, all
sampled at temperature 1.0 (top_p 1, no top-k) with max_new_tokens 60 from the same seed:

(a) one at a time, the plain way: transformers' `generate` per conversation (batch of 1, the whole
    prompt, nothing shared), ending at EOS or after 60 tokens: what `generate_texts` did per
    batch of 1 before the shared prefix.
(b) the asset's way: `generate_texts` on batches of 8 conversations, as `LLM.complete` gets them:
    the prompts' common prefix (instruction and few-shot neurons) computed once per process and
    reused, each prompt's own tokens computed on top of it, an answer ending at the end of its
    first line. On a CPU with a grouped-query-attention model (SmolLM2) the rows of a batch then
    decode one after the other (see `_decodes_rows_together` in local_llm.py), so (b) is also
    "one at a time with the shared prefix".
(c) (a), but ending at the end of the answer's first line too: separates what the early stop
    buys from what the shared prefix and the in-place cache buy.

(a) and (c) each answer half of the neurons before (b) and half after it (each half from the
seed), so that a load that drifts during the run weighs on every way alike.

Prints wall-clock and CPU seconds, neurons/s, prompt tokens computed (positions of forward passes
over more than one token), tokens generated, and the ratio (b) vs (a) against the target (>= 2x).
Targets are judged on the wall clock; on a shared machine other processes slow it down, so the
CPU time of this process and the load average before and after are shown too.

Run: .venv/bin/python bench/explanations.py [--neurons N] [--layer L] [--windows W] [--seed S]
     [--threads T]   (about 4 minutes on 2 idle cores with the defaults)
"""

import argparse
import os
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList

from neuron_assets.method.prompts import clean_explanation, explainer_messages, load_fewshot
from neuron_assets.method.records import RecordSampler, split_top
from neuron_assets.resources.corpus import python_docs, token_windows
from neuron_assets.resources.local_llm import chat_text, generate_texts
from neuron_assets.resources.models import describe_model, load_causal_lm, model_shape
from neuron_assets.resources.subject_model import SubjectModel

FEWSHOT = Path(__file__).resolve().parents[1] / "resources" / "prompts" / "explainer_fewshot.json"
MODEL, CACHE, DEVICE = "embedded", "~/.cache/neuron_assets", "auto"
SEQ_LEN = 64
TRAIN_TOP = 20  # split_top deals 4 splits of 5 top records; the explainer sees the 5 train ones
MAX_NEW_TOKENS = 60
TEMPERATURE = 1.0
ASSET_BATCH = 8  # LLM.batch_size: neurons per `complete` call
TARGET = 2.0


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--neurons", type=int, default=8, help="neurons explained by each way")
    parser.add_argument("--layer", type=int, default=3, help="layer of the neurons")
    parser.add_argument("--windows", type=int, default=256, help="corpus windows the records come from")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed, the same for every way")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads")
    return parser.parse_args()


def explainer_conversations(n: int, layer: int, windows: int) -> list[list[dict]]:
    """Explainer messages (with the answer's prefill, as the local backend sends them) for the first
    `n` neurons of `layer` that activate at all, from their train top records over `windows`
    windows of the embedded corpus."""
    subject = SubjectModel(model=MODEL, cache=CACHE, device=DEVICE)
    corpus = token_windows(subject.tokenizer(), python_docs(), SEQ_LEN, max_windows=windows)
    token_ids = np.stack(corpus["token_ids"])
    sampler = RecordSampler(model_shape(MODEL, CACHE).n_neurons, SEQ_LEN, n_top=TRAIN_TOP, n_random=1, quantile_pool=1)
    for start, acts in subject.unit_activations(token_ids, [layer]):
        sampler.update(acts[layer], np.arange(start, start + len(acts[layer])))
    records, _ = sampler.finalize()
    top: dict[int, list] = {}
    rows = zip(records["unit"], records["kind"], records["seq_id"], records["activations"])
    for neuron, kind, seq_id, acts in rows:  # in neuron, kind, rank order
        if kind == "top":
            top.setdefault(int(neuron), []).append((int(seq_id), acts))
    fewshot = load_fewshot(FEWSHOT)
    conversations = []
    for neuron in sorted(top):
        if max(float(acts.max()) for _, acts in top[neuron]) <= 0:  # the asset skips these too
            continue
        shown = [(corpus["tokens"][seq_id], acts) for seq_id, acts in split_top(top[neuron])["train"]]
        conversations.append(explainer_messages(shown, fewshot, prefill=True))
        if len(conversations) == n:
            break
    return conversations


class FirstLineEnd(StoppingCriteria):
    """Stops a batch-of-1 generation once its answer has a newline after some text: the rule
    `generate_texts` applies (`clean_explanation` keeps only the first non-empty line)."""

    def __init__(self, tokenizer, prompt_length: int):
        self.tokenizer, self.prompt_length = tokenizer, prompt_length

    def __call__(self, input_ids, scores, **kwargs) -> torch.BoolTensor:
        text = self.tokenizer.decode(input_ids[0, self.prompt_length :], skip_special_tokens=True)
        return torch.tensor(["\n" in text.lstrip()], device=input_ids.device)


def eos_ids(model, tokenizer) -> list[int]:
    configured = model.generation_config.eos_token_id
    ids = {configured} if isinstance(configured, int) else set(configured or [])
    return sorted(ids | {tokenizer.eos_token_id})


def plain_generate(model, tokenizer, conversations, seed: int, first_line_only: bool) -> list[dict]:
    """(a) / (c): transformers' `generate` per conversation, the whole prompt, a batch of 1."""
    stops = eos_ids(model, tokenizer)
    config = GenerationConfig(max_new_tokens=MAX_NEW_TOKENS, do_sample=True, temperature=TEMPERATURE, top_p=1.0,
                              top_k=0, typical_p=1.0, num_beams=1, repetition_penalty=1.0, no_repeat_ngram_size=0,
                              pad_token_id=stops[0], eos_token_id=stops)
    answers = []
    with torch.random.fork_rng(), torch.inference_mode():
        torch.manual_seed(seed)
        for conversation in conversations:
            prompt = tokenizer(chat_text(tokenizer, conversation), add_special_tokens=False)["input_ids"]
            ids = torch.tensor([prompt], device=model.device)
            criteria = StoppingCriteriaList([FirstLineEnd(tokenizer, len(prompt))] if first_line_only else [])
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config,
                                 stopping_criteria=criteria)
            new = out[0, len(prompt) :].tolist()
            n = next((i + 1 for i, token in enumerate(new) if token in stops), len(new))
            answers.append({"text": tokenizer.decode(new[:n], skip_special_tokens=True), "tokens_out": n})
    return answers


def asset_generate(model, tokenizer, conversations, seed: int) -> list[dict]:
    """(b): `generate_texts` per batch of 8 conversations, as `LLM.complete` calls it."""
    answers = []
    for start in range(0, len(conversations), ASSET_BATCH):
        answers += generate_texts(model, tokenizer, conversations[start : start + ASSET_BATCH],
                                  max_new_tokens=MAX_NEW_TOKENS, temperature=TEMPERATURE, seed=seed,
                                  batch_size=ASSET_BATCH)
    return answers


class Run(NamedTuple):
    wall: float
    cpu: float
    prompt_tokens: int  # positions of forward passes over more than one token
    generated: int
    answers: list[dict]


def measure(model, generate, *args) -> Run:
    shapes = []
    hook = model.register_forward_hook(lambda mod, a, kwargs, out: shapes.append(kwargs["input_ids"].shape),
                                       with_kwargs=True)
    try:
        wall, cpu = time.perf_counter(), time.process_time()
        answers = generate(*args)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    finally:
        hook.remove()
    prompt_tokens = sum(rows * length for rows, length in shapes if length > 1)
    return Run(wall, cpu, prompt_tokens, sum(a["tokens_out"] for a in answers), answers)


def joined(first: Run, second: Run) -> Run:
    """One way's two halves as one run."""
    return Run(first.wall + second.wall, first.cpu + second.cpu, first.prompt_tokens + second.prompt_tokens,
               first.generated + second.generated, first.answers + second.answers)


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    model, tokenizer = load_causal_lm(MODEL, CACHE, DEVICE)
    print("Explanation throughput: one at a time, the plain way, vs the asset's way (shared prefix)")
    print(f"model: {describe_model(MODEL)}, {model.config.model_type}, {model.dtype}, "
          f"attention {model.config._attn_implementation}; device: {model.device}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {os.cpu_count()} CPUs")
    start = time.perf_counter()
    conversations = explainer_conversations(args.neurons, args.layer, args.windows)
    prompts = [tokenizer(chat_text(tokenizer, c), add_special_tokens=False)["input_ids"] for c in conversations]
    shared = 0
    while shared < min(map(len, prompts)) and len({p[shared] for p in prompts}) == 1:
        shared += 1
    print(f"{len(conversations)} neurons of layer {args.layer}, records from {args.windows} windows of "
          f"{SEQ_LEN} tokens ({time.perf_counter() - start:.0f} s); prompts {min(map(len, prompts))}-"
          f"{max(map(len, prompts))} tokens, mean {np.mean(list(map(len, prompts))):.0f}, common prefix {shared}")
    print(f"sampling: temperature {TEMPERATURE}, top_p 1, max_new_tokens {MAX_NEW_TOKENS}, seed {args.seed}")
    print()
    halves = conversations[: len(conversations) // 2], conversations[len(conversations) // 2 :]
    plain = [measure(model, plain_generate, model, tokenizer, halves[0], args.seed, False)]
    early = [measure(model, plain_generate, model, tokenizer, halves[0], args.seed, True)]
    asset = measure(model, asset_generate, model, tokenizer, conversations, args.seed)
    early.append(measure(model, plain_generate, model, tokenizer, halves[1], args.seed, True))
    plain.append(measure(model, plain_generate, model, tokenizer, halves[1], args.seed, False))
    runs = {
        "(a) one at a time, plain generate": joined(*plain),
        "(b) asset's way: generate_texts, batches of 8": asset,
        "(c) (a) ending at the first line too": joined(*early),
    }
    load_after = os.getloadavg()
    n = len(conversations)
    print(f"{'way':<48} {'wall s':>8} {'cpu s':>8} {'neurons/s':>10} {'prompt tokens':>14} {'generated':>10}")
    for label, run in runs.items():
        print(f"{label:<48} {run.wall:>8.1f} {run.cpu:>8.1f} {n / run.wall:>10.3f} {run.prompt_tokens:>14,} "
              f"{run.generated:>10,}")
    print(f"load average (1 min) before {load_before[0]:.2f}, after {load_after[0]:.2f}")
    print()
    plain, asset, early = runs.values()
    print("first explanations, (a) | (b):")
    for a, b in list(zip(plain.answers, asset.answers))[:4]:
        print(f"  {clean_explanation(a['text'])!r} | {clean_explanation(b['text'])!r}")
    print()
    ratio = plain.wall / asset.wall
    print(f"(b) vs (c): {early.wall / asset.wall:.2f}x wall (shared prefix + in-place cache); "
          f"(c) vs (a): {plain.wall / early.wall:.2f}x wall (ending at the first line)")
    print(f"(b) vs (a): {ratio:.2f}x wall, {plain.cpu / asset.cpu:.2f}x cpu (target >= {TARGET:g}x) "
          f"{'PASS' if ratio >= TARGET else 'MISS'}")


if __name__ == "__main__":
    main()
