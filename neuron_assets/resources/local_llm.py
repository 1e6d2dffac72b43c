"""The in-process explainer and simulator: a Hugging Face causal LM already loaded by the caller.

- `chat_text` / `generate_texts`: batched chat generation for the explainer (METHOD.md section 3).
- `LocalSimulator`: the paper's "all at once" simulator (METHOD.md section 4). Instead of parsing
  echoed prompt logprobs from an API, it reads the next-token distribution over the value tokens
  "0".."10" straight from the logits at every read position (the TAB after each token).

The fixed part of the simulator prompt (instruction, few-shot neurons, the explanation) is the same
for every sequence of a neuron, so its key/value cache is computed once and reused.
No Dagster import: the resource in this package wraps these functions.
"""

import inspect

import numpy as np
import torch
from transformers import DynamicCache, GenerationConfig

from neuron_assets.method.simulation import value_distribution

VALUES = list(range(11))

# Architectures whose attention ignores (or mishandles) a custom 4D attention mask in
# transformers 5.24; chain mode then uses the slower one-forward-per-position path.
# Checked by tests/test_local_llm.py against a cache-free reference: llama, gpt2 and gpt_neox
# all honour the mask (the 4D mask is passed through `create_causal_mask` untouched).
NO_CUSTOM_4D_MASK: set[str] = set()
# Attention kernels that take the additive 4D mask as is (flash-attention kernels do not).
MASKABLE_ATTENTION = {"eager", "sdpa"}


# ----------------------------------------------------------------------------- generation


def chat_text(tokenizer, messages: list[dict]) -> str:
    """Render `messages` as the prompt text the model should continue.

    Uses the tokenizer's chat template with a generation prompt. A conversation that ends with an
    assistant message is a prefill: it is continued rather than closed. Tokenizers without a
    template (tiny test tokenizers, base models) get a plain "Role: content" rendering.
    """
    prefill = bool(messages) and messages[-1]["role"] == "assistant"
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            messages,
            tokenize=False,
            add_generation_prompt=not prefill,
            continue_final_message=prefill,
        )
    turns = [f"{m['role'].capitalize()}: {m['content']}" for m in messages]
    text = "\n\n".join(turns)
    return text if prefill else text + "\n\nAssistant:"


def _pad_id(tokenizer) -> int:
    """A token id for padding; padded positions are masked, so any id works, EOS is customary."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0


def _eos_ids(model, tokenizer) -> list[int]:
    """Every id that ends a generation: the model's generation config may list several."""
    ids = set()
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for source in (configured, tokenizer.eos_token_id):
        if isinstance(source, int):
            ids.add(source)
        elif source is not None:
            ids.update(int(i) for i in source)
    return sorted(ids)


def _generation_config(max_new_tokens, temperature, top_p, pad_id, eos_ids) -> GenerationConfig:
    """Exactly the reference sampling: no top-k (transformers defaults to 50), no penalties.

    Unset fields would be filled from the model's own generation_config (which may ask for
    top-k, penalties or sampling), so everything that shapes the output is set here.
    """
    sampling = temperature > 0
    params = dict(
        max_new_tokens=max_new_tokens,
        do_sample=sampling,
        num_beams=1,
        repetition_penalty=1.0,
        no_repeat_ngram_size=0,
        pad_token_id=pad_id,
        eos_token_id=eos_ids or None,
    )
    if sampling:  # sampling-only flags: transformers warns about them in greedy mode
        params.update(temperature=temperature, top_p=top_p, top_k=0, typical_p=1.0)
    return GenerationConfig(**params)


def _left_pad(rows: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token rows so that every prompt ends where generation starts."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = torch.tensor(r, dtype=torch.long)
        mask[i, width - len(r) :] = 1
    return ids.to(device), mask.to(device)


def _count_new_tokens(new: list[int], eos_ids: list[int]) -> int:
    """Generated tokens up to and including the first EOS; what follows is padding."""
    for i, token in enumerate(new):
        if token in eos_ids:
            return i + 1
    return len(new)


def _rng_devices(device: torch.device) -> list:
    """fork_rng must know the CUDA device to save and restore its generator too."""
    return [device] if device.type == "cuda" else []


def generate_texts(
    model,
    tokenizer,
    conversations: list[list[dict]],
    max_new_tokens: int = 60,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
    batch_size: int = 8,
) -> list[dict]:
    """Generate one completion per conversation, in batches.

    temperature 0 is greedy; otherwise sampling with `top_p`, reproducible for a given `seed` (the
    global RNG is seeded inside a fork, so callers' random state is untouched). Returns per
    conversation {"text", "tokens_in", "tokens_out"}: the decoded new tokens without special
    tokens, the prompt length, and the generated length up to and including EOS.
    """
    # Templates carry their own BOS; only the plain rendering asks the tokenizer for special tokens.
    special = not getattr(tokenizer, "chat_template", None)
    prompts = [tokenizer(chat_text(tokenizer, c), add_special_tokens=special)["input_ids"] for c in conversations]
    # Padding is done by hand, so a tokenizer without a pad token needs no (lasting) change.
    pad_id, eos_ids = _pad_id(tokenizer), _eos_ids(model, tokenizer)
    config = _generation_config(max_new_tokens, temperature, top_p, pad_id, eos_ids)
    results = []
    with torch.random.fork_rng(devices=_rng_devices(model.device)), torch.inference_mode():
        torch.manual_seed(seed)
        for start in range(0, len(prompts), batch_size):
            rows = prompts[start : start + batch_size]
            ids, mask = _left_pad(rows, pad_id, model.device)
            out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
            for row, generated in zip(rows, out[:, ids.shape[1] :].tolist()):
                n = _count_new_tokens(generated, eos_ids)
                text = tokenizer.decode(generated[:n], skip_special_tokens=True)
                results.append({"text": text, "tokens_in": len(row), "tokens_out": n})
    return results


# ----------------------------------------------------------------------------- simulation


def value_token_ids(tokenizer) -> tuple[str, list[int]]:
    """Find how the tokenizer writes the values 0..10: ("direct", 11 ids) or ("chain", 10 ids).

    Chain mode is for tokenizers that split numbers into digits (SmolLM2, Llama): "10" is "1" then
    "0", so p(10) needs the probability of "0" after "1". Anything else cannot express the scale.
    """
    pieces = {v: tokenizer(str(v), add_special_tokens=False)["input_ids"] for v in VALUES}
    digits = [pieces[v] for v in range(10)]
    # Distinct and known: a vocabulary without digits maps them all to one unknown token.
    if all(len(p) == 1 for p in digits) and _distinct_known(tokenizer, [p[0] for p in digits]):
        ids = [p[0] for p in digits]
        if len(pieces[10]) == 1 and _distinct_known(tokenizer, ids + pieces[10]):
            return "direct", ids + pieces[10]
        if pieces[10] == [ids[1], ids[0]]:
            return "chain", ids
    found = ", ".join(f"'{v}'->{tokenizer.convert_ids_to_tokens(pieces[v])}" for v in VALUES)
    raise ValueError(
        "the simulator's tokenizer cannot express values 0-10: each of '0'..'9' must be a single "
        "token and '10' either one token or the tokens '1','0'; found " + found
    )


def _distinct_known(tokenizer, ids: list[int]) -> bool:
    return len(set(ids)) == len(ids) and tokenizer.unk_token_id not in ids


def _max_positions(config) -> int | None:
    for name in ("max_position_embeddings", "n_positions"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    return None


def _accepts(model, name: str) -> bool:
    return name in inspect.signature(model.forward).parameters


class LocalSimulator:
    """The "all at once" simulator on an in-process causal LM, with a cached prompt prefix.

    `prefix` is the fixed prompt text up to the first segment of a sequence. `simulate` takes
    sequences of text segments where segment i ends right where the value of token i is written
    (after its TAB) and returns, per sequence, a float64 [T, 11] array of p(value) for 0..10:
    softmax probabilities over the full vocabulary, not renormalised over the values.

    Expects the model in eval mode (what `from_pretrained` returns).
    """

    def __init__(self, model, tokenizer, prefix: str, batch_size: int = 8):
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.mode, self.value_ids = value_token_ids(tokenizer)
        self.tokens_processed = 0
        self._pad_id = _pad_id(tokenizer)
        self._max_positions = _max_positions(model.config)
        self._keep_logits = _accepts(model, "logits_to_keep")
        self._custom_mask = (
            model.config.model_type not in NO_CUSTOM_4D_MASK
            and getattr(model.config, "_attn_implementation", "eager") in MASKABLE_ATTENTION
        )
        prefix_ids = tokenizer(prefix, add_special_tokens=True)["input_ids"]
        self.prefix_tokens = len(prefix_ids)
        if self._max_positions is not None and self.prefix_tokens >= self._max_positions:
            raise ValueError(
                f"the simulator's few-shot prefix has {self.prefix_tokens} tokens, more than its context "
                f"of {self._max_positions}: use a simulator with a longer context or fewer few-shot examples"
            )
        self._prefix_kv = self._encode_prefix(prefix_ids)

    # -- the prefix cache

    def _encode_prefix(self, ids: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Run the prefix once and keep its per-layer keys and values (batch of 1)."""
        if not ids:
            return []
        cache = DynamicCache()
        # Only the cache is wanted: skip the vocabulary projection where the model allows it.
        skip = {"logits_to_keep": 1} if self._keep_logits else {}
        with torch.inference_mode():
            self.model(input_ids=torch.tensor([ids], device=self.model.device), cache=cache, use_cache=True, **skip)
        self.tokens_processed += len(ids)
        return [(layer.keys, layer.values) for layer in cache.layers]

    def _batch_cache(self, n: int) -> DynamicCache:
        """A fresh cache holding the prefix for `n` rows; the model appends to it in place, so
        every batch needs its own (the stored prefix tensors are never modified)."""
        if not self._prefix_kv:
            return DynamicCache()
        return DynamicCache([(k.expand(n, -1, -1, -1), v.expand(n, -1, -1, -1)) for k, v in self._prefix_kv])

    def _forward(self, keep: torch.Tensor | None = None, **inputs):
        """One model call; with `keep` (bool [B, Q]) only those positions get vocabulary logits,
        flattened to [N, V] in row-major order."""
        if keep is not None and self._keep_logits:
            return self.model(**inputs, use_cache=True, logits_to_keep=keep).logits
        logits = self.model(**inputs, use_cache=True).logits
        return logits if keep is None else logits[keep]

    # -- public API

    @torch.inference_mode()
    def simulate(self, sequences: list[list[str]]) -> list[np.ndarray]:
        """Per sequence, a float64 [T, 11] array of p(value 0..10) at each segment's end."""
        encoded = [self._encode(seq) for seq in sequences]
        results: list[np.ndarray | None] = [np.zeros((0, 11)) if not r else None for _, r in encoded]
        # Batch similar lengths together: less padding, same results.
        todo = sorted((i for i, (_, r) in enumerate(encoded) if r), key=lambda i: len(encoded[i][0]))
        for start in range(0, len(todo), self.batch_size):
            batch = todo[start : start + self.batch_size]
            for i, probs in zip(batch, self._simulate_batch([encoded[i] for i in batch])):
                results[i] = probs
        return results

    # -- one batch

    def _encode(self, segments: list[str]) -> tuple[list[int], list[int]]:
        """Token ids of the concatenated segments and the index of each segment's last token."""
        if not segments:
            return [], []
        pieces = self.tokenizer(list(segments), add_special_tokens=False)["input_ids"]
        ids, reads = [], []
        for i, piece in enumerate(pieces):
            if not piece:
                raise ValueError(f"segment {i} ({segments[i]!r}) has no tokens: it has no read position")
            ids.extend(piece)
            reads.append(len(ids) - 1)
        needed = self.prefix_tokens + len(ids) + (self.mode == "chain")
        if self._max_positions is not None and needed > self._max_positions:
            raise ValueError(
                f"prompt of {needed} tokens (prefix {self.prefix_tokens}) exceeds the simulator's "
                f"context of {self._max_positions} tokens"
            )
        return ids, reads

    def _simulate_batch(self, batch: list[tuple[list[int], list[int]]]) -> list[np.ndarray]:
        """Main pass over the right-padded batch, plus the chain pass for p(10) if needed."""
        P, device = self.prefix_tokens, self.model.device
        n, width = len(batch), max(len(ids) for ids, _ in batch)
        ids = torch.full((n, width), self._pad_id, dtype=torch.long)
        attention = torch.zeros((n, P + width), dtype=torch.long)
        attention[:, :P] = 1
        keep = torch.zeros((n, width), dtype=torch.bool)
        for b, (row, reads) in enumerate(batch):
            ids[b, : len(row)] = torch.tensor(row)
            attention[b, P : P + len(row)] = 1
            keep[b, reads] = True
        # Right padding: real tokens sit at the same positions as in an unpadded run, and
        # causality already hides the padding after them; the mask hides it from pad rows' view.
        positions = (P + torch.arange(width)).expand(n, width)
        cache = self._batch_cache(n)
        logits = self._forward(
            input_ids=ids.to(device),
            attention_mask=attention.to(device),
            position_ids=positions.to(device),
            cache=cache,
            keep=keep.to(device),
        )
        self.tokens_processed += sum(len(row) for row, _ in batch)
        probs = self._value_probs(logits)  # [N, 10 or 11], N = all read positions, row-major
        per_row = np.split(probs, np.cumsum([len(reads) for _, reads in batch])[:-1])
        if self.mode == "direct":
            return per_row
        zeros = self._chain_zero_probs(batch, cache, width)
        return [value_distribution(d, z) for d, z in zip(per_row, zeros)]

    def _value_probs(self, logits: torch.Tensor) -> np.ndarray:
        """Softmax over the full vocabulary, then the value tokens' probabilities (float64)."""
        logp = torch.log_softmax(logits.float(), dim=-1)[:, self.value_ids]
        return logp.double().exp().cpu().numpy()

    # -- chain mode: p("0" | ... read position, "1")

    def _chain_zero_probs(self, batch, cache: DynamicCache, width: int) -> list[np.ndarray]:
        """z at every read position of the batch: the probability of "0" right after a "1"
        written at that position."""
        self.tokens_processed += sum(len(reads) for _, reads in batch)
        if self._custom_mask:
            return self._chain_one_pass(batch, cache, width)
        return self._chain_per_position(batch, cache, width)

    def _chain_one_pass(self, batch, cache: DynamicCache, width: int) -> list[np.ndarray]:
        """All z of the batch in one forward pass: after the cached prefix + sequence, append one
        "1" per read position; a custom 4D mask lets extra token j see only the prefix, the
        sequence up to and including its read position, and itself, at position id read + 1."""
        P, device, dtype = self.prefix_tokens, self.model.device, self.model.dtype
        n, extra = len(batch), max(len(reads) for _, reads in batch)
        blocked = torch.finfo(dtype).min
        mask = torch.full((n, 1, extra, P + width + extra), blocked, dtype=dtype)
        mask[..., :P] = 0
        positions = torch.full((n, extra), P, dtype=torch.long)
        keep = torch.zeros((n, extra), dtype=torch.bool)
        sequence = torch.arange(width)
        for b, (_, reads) in enumerate(batch):
            r = torch.tensor(reads)
            t = len(reads)
            visible = sequence[None, :] <= r[:, None]  # [t, width]
            mask[b, 0, :t, P : P + width].masked_fill_(visible, 0)
            positions[b, :t] = P + r + 1
            keep[b, :t] = True
        # Every extra token (padding ones too) sees itself: no row is fully masked.
        diagonal = torch.arange(extra)
        mask[:, 0, diagonal, P + width + diagonal] = 0
        ones = torch.full((n, extra), self.value_ids[1], dtype=torch.long)
        logits = self._forward(
            input_ids=ones.to(device),
            attention_mask=mask.to(device),
            position_ids=positions.to(device),
            cache=cache,
            keep=keep.to(device),
        )
        z = self._value_probs(logits)[:, 0]
        return np.split(z, np.cumsum([len(reads) for _, reads in batch])[:-1])

    def _chain_per_position(self, batch, cache: DynamicCache, width: int) -> list[np.ndarray]:
        """Fallback for attention that cannot take a custom 4D mask: one forward of a single "1"
        per row for each read index j, with an ordinary 2D mask hiding the sequence after read
        position j; the cache is cropped back after each step. Correct but T times the calls."""
        P, device = self.prefix_tokens, self.model.device
        n, extra = len(batch), max(len(reads) for _, reads in batch)
        z = [np.zeros(len(reads)) for _, reads in batch]
        ones = torch.full((n, 1), self.value_ids[1], dtype=torch.long, device=device)
        for j in range(extra):
            attention = torch.zeros((n, P + width + 1), dtype=torch.long)
            attention[:, :P] = 1
            attention[:, -1] = 1
            positions = torch.full((n, 1), P, dtype=torch.long)
            for b, (_, reads) in enumerate(batch):
                if j < len(reads):
                    attention[b, P : P + reads[j] + 1] = 1
                    positions[b, 0] = P + reads[j] + 1
            logits = self._forward(
                input_ids=ones, attention_mask=attention.to(device), position_ids=positions.to(device), cache=cache
            )
            cache.crop(-1)
            probs = self._value_probs(logits[:, -1])[:, 0]
            for b, (_, reads) in enumerate(batch):
                if j < len(reads):
                    z[b][j] = probs[b]
        return z

