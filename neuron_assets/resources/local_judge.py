"""The in-process judge of the detection and fuzzing scorers (docs/method.md, Detection and
fuzzing): a 0/1 decision per excerpt read from a causal LM's logits, where a small model asked to
write the JSON list of decisions would write something else.

The judge's conversation is the prompt, and its answer is forced as the list "[d1, d2, ..., dn]":
at slot k the next-token logits of the tokens "0" and "1" give p_k = p("1") renormalised over the
two, and d_k = 1 where p_k > 1/2 (the larger logit); slot k + 1 is read after d_k and the separator
", ", as if the judge had written the list. The prompt's keys and values stay in a cache (its part
shared with other prompts, the instruction, is computed once), and the list is read in a few passes
of its ~3n tokens each (`_read_slots`), so a batch of n excerpts costs about one pass over its
prompt. No sampling: the same prompt gets the same decisions.

No Dagster import: the LLM resource (llm.py) wraps this and caches its answers.
"""

from dataclasses import dataclass

import torch

from neuron_assets.resources.local_llm import (
    _decodes_rows_together,
    _max_positions,
    _prefill_rows,
    _shared_prefix,
    chat_text,
)

# Names this method in the response cache's keys: change it when the decisions or probabilities
# it gives for a prompt change, so old entries are not reused.
JUDGE_METHOD = "forced-list-logits-2"
OPENING, SEPARATOR = "[", ", "


@dataclass(frozen=True)
class Judgement:
    """The judge's reading of one conversation: a decision and p("1") per excerpt, and the tokens
    of its prompt (the list's opening included)."""

    decisions: list[int]
    p_one: list[float]
    prompt_tokens: int


def digit_token_ids(tokenizer) -> tuple[int, int]:
    """The ids of the single tokens "0" and "1"; ValueError when the tokenizer has none."""
    pieces = [tokenizer(digit, add_special_tokens=False)["input_ids"] for digit in ("0", "1")]
    ids = [piece[0] for piece in pieces if len(piece) == 1]
    if len(ids) != 2 or ids[0] == ids[1] or tokenizer.unk_token_id in ids:
        found = ", ".join(f"{d!r} -> {tokenizer.convert_ids_to_tokens(p)}" for d, p in zip("01", pieces))
        raise ValueError(f"the judge's tokenizer must write '0' and '1' as one token each, found {found}: "
                         "use a judge model whose tokenizer has single-digit tokens (SmolLM2, Llama, GPT-2)")
    return ids[0], ids[1]


def judge_conversations(model, tokenizer, conversations: list[list[dict]], sizes: list[int],
                        batch_size: int = 8) -> list[Judgement]:
    """One Judgement of sizes[i] excerpts per conversation, in input order.

    Prompts of similar length are read together, up to `batch_size` where the device makes that
    cheaper (as for generation, local_llm.py). ValueError when the tokenizer has no single-token
    digits or a prompt and its answer exceed the model's context.
    """
    if len(sizes) != len(conversations):
        raise ValueError(f"{len(conversations)} conversations but {len(sizes)} sizes")
    if not conversations:
        return []
    zero, one = digit_token_ids(tokenizer)
    opening = tokenizer(OPENING, add_special_tokens=False)["input_ids"]
    separator = tokenizer(SEPARATOR, add_special_tokens=False)["input_ids"]
    # Templates carry their own BOS; only the plain rendering asks the tokenizer for special tokens.
    special = not getattr(tokenizer, "chat_template", None)
    prompts = [tokenizer(chat_text(tokenizer, c), add_special_tokens=special)["input_ids"] + opening
               for c in conversations]
    context = _max_positions(model.config)
    for i, (prompt, n) in enumerate(zip(prompts, sizes)):
        needed = len(prompt) + (n - 1) * (1 + len(separator))
        if context is not None and needed > context:
            raise ValueError(f"judge prompt {i} with its answer needs {needed} tokens, more than the judge model's "
                             f"context of {context}: use a judge with a longer context or shorter excerpts")
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    group = batch_size if _decodes_rows_together(model) else 1
    results: list[Judgement | None] = [None] * len(prompts)
    with torch.inference_mode():
        prefix = _shared_prefix(model, prompts)
        for begin in range(0, len(order), group):
            rows = order[begin:begin + group]
            slots = max(sizes[i] for i in rows)
            cache, logits = _prefill_rows(model, prefix, [prompts[i] for i in rows],
                                          max(len(prompts[i]) for i in rows) + (slots - 1) * (1 + len(separator)))
            p_one = _read_slots(model, cache, logits, slots, zero, one, separator)
            for row, i in enumerate(rows):
                probabilities = p_one[row][:sizes[i]]
                results[i] = Judgement([int(p > 0.5) for p in probabilities], probabilities, len(prompts[i]))
    return results


def _read_slots(model, cache, logits: torch.Tensor, slots: int, zero: int, one: int,
                separator: list[int]) -> list[list[float]]:
    """p("1") at each of `slots` digit slots of every row; `logits` [rows, V] are those after each
    row's prompt, slot 0's.

    The list's later digits are guessed (all like the first), the whole list is fed after the prompt
    in one pass that reads every slot, and the decisions are the next guess, until they agree with
    it: then every slot was read after the digits decided before it, as if the list were written one
    value at a time. Slot k is right from pass k on, so this ends within `slots` passes (usually two
    or three, each about as costly as one step of a few tokens).
    """
    first = logits[:, [zero, one]].double()
    decided = (first[:, 1] > first[:, 0]).long()[:, None].repeat(1, slots)  # p("1") > 1/2: the larger logit
    pairs = first.new_zeros((len(first), 0, 2))  # no slot after the first when there is one excerpt
    lengths = list(cache.layers[0].lengths)
    digits = torch.tensor([zero, one], device=model.device)
    step = 1 + len(separator)
    tail = torch.tensor(separator, device=model.device).expand(len(decided), slots - 1, -1)
    while slots > 1:
        ids = torch.cat([digits[decided[:, :-1]][:, :, None], tail], dim=2).flatten(1)
        pairs = _forward(model, ids, cache)[:, step - 1::step][:, :, [zero, one]].double()  # [rows, slots - 1, 2]
        for layer in cache.layers:  # back to the prompt alone: the next pass overwrites the list
            layer.lengths = list(lengths)
            layer._expose()
        read = (pairs[..., 1] > pairs[..., 0]).long()
        if torch.equal(read, decided[:, 1:]):
            break
        decided[:, 1:] = read
    return torch.softmax(torch.cat([first[:, None], pairs], dim=1), dim=-1)[..., 1].tolist()


def _forward(model, ids: torch.Tensor, cache) -> torch.Tensor:
    """Feed `ids` [rows, q] after each row's cached tokens; the logits [rows, q, V] at them.

    Rows of one length need only the causal mask the model builds; rows of different lengths sit
    right-padded in the cache, so query t of row i may see key columns up to lengths[i] + t only.
    """
    lengths = torch.tensor(cache.layers[0].lengths, device=model.device)
    q = ids.shape[1]
    positions = lengths[:, None] + torch.arange(q, device=model.device)
    mask = None
    if len(set(cache.layers[0].lengths)) > 1:
        columns = torch.arange(int(lengths.max()) + q, device=model.device)
        visible = columns[None, None, :] <= positions[:, :, None]  # [rows, q, keys]
        mask = torch.zeros(visible.shape, dtype=model.dtype, device=model.device)
        mask = mask.masked_fill(~visible, torch.finfo(model.dtype).min)[:, None]
    return model(input_ids=ids, position_ids=positions, attention_mask=mask, cache=cache, use_cache=True).logits
