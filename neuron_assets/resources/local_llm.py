"""The in-process explainer and simulator: a Hugging Face causal LM already loaded by the caller.

- `chat_text` / `generate_texts`: chat generation for the explainer (docs/method.md, Explanation), with
  the prompts' shared few-shot prefix computed once, stopping at the end of the answer's first line.
- `LocalSimulator`: the paper's "all at once" simulator (docs/method.md, Simulation). Instead of parsing
  echoed prompt logprobs from an API, it reads the next-token distribution over the value tokens
  "0".."10" straight from the logits at every read position (the TAB after each token).

The fixed part of the simulator prompt (instruction, few-shot neurons, the explanation) is the same
for every sequence of a neuron, so its key/value cache is computed once and reused.
No Dagster import: the resource in this package wraps these functions.
"""

import inspect
import weakref
from dataclasses import dataclass

import numpy as np
import torch
from transformers import Cache, DynamicCache
from transformers.cache_utils import DynamicLayer

from neuron_assets.method.simulation import VALUES, value_distribution
from neuron_assets.stages.results import Answer, Usage

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


def _rng_devices(device: torch.device) -> list:
    """fork_rng must know the CUDA device to save and restore its generator too."""
    return [device] if device.type == "cuda" else []


class _RowCache(DynamicLayer):
    """One layer's keys and values for a few rows, in preallocated [rows, heads, capacity, dim]
    buffers where every row has its own length.

    New entries are written in place at each row's end: a decode step costs a write of one entry
    per row, where DynamicLayer copies the whole cache, and rows of different lengths need no left
    padding. `keys` / `values` are views up to the longest row; whatever lies beyond a shorter row's
    length must be hidden from it by the attention mask.
    """

    def __init__(self, capacity: int, prefix: tuple[torch.Tensor, torch.Tensor] | None = None):
        super().__init__()
        self.capacity = capacity
        self.lengths = [0]
        if prefix is not None:
            keys, values = prefix
            self.lazy_initialization(keys, values)
            self.key_buffer[:, :, : keys.shape[-2]] = keys
            self.value_buffer[:, :, : values.shape[-2]] = values
            self.lengths = [keys.shape[-2]]
            self._expose()

    @classmethod
    def stacked(cls, rows: list["_RowCache"]) -> "_RowCache":
        """The rows of several caches of equal capacity as one batch."""
        merged = cls(rows[0].capacity)
        merged.device, merged.is_initialized = rows[0].device, True
        merged.key_buffer = torch.cat([r.key_buffer for r in rows])
        merged.value_buffer = torch.cat([r.value_buffer for r in rows])
        merged.lengths = [n for r in rows for n in r.lengths]
        merged._expose()
        return merged

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        rows, heads, _, key_dim = key_states.shape
        self.device = key_states.device
        # Zeros, not empty: masked-out entries still meet a zero attention weight, and 0 * NaN is NaN.
        self.key_buffer = key_states.new_zeros((rows, heads, self.capacity, key_dim))
        self.value_buffer = value_states.new_zeros((rows, heads, self.capacity, value_states.shape[-1]))
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        rows, _, new, _ = key_states.shape
        if len(set(self.lengths)) == 1:  # one row, or rows of one length: a plain slice
            start = self.lengths[0]
            self.key_buffer[:, :, start : start + new] = key_states
            self.value_buffer[:, :, start : start + new] = value_states
        else:
            columns = torch.tensor(self.lengths, device=self.device)[:, None] + torch.arange(new, device=self.device)
            row_index = torch.arange(rows, device=self.device)[:, None]
            self.key_buffer[row_index, :, columns] = key_states.transpose(1, 2)
            self.value_buffer[row_index, :, columns] = value_states.transpose(1, 2)
        self.lengths = [n + new for n in self.lengths]
        self._expose()
        return self.keys, self.values

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.key_buffer, self.value_buffer = self.key_buffer[indices], self.value_buffer[indices]
        self.lengths = [self.lengths[i] for i in indices.tolist()]
        self._expose()

    def _expose(self) -> None:
        width = max(self.lengths)
        self.keys, self.values = self.key_buffer[:, :, :width], self.value_buffer[:, :, :width]


@dataclass(frozen=True)
class _Prefix:
    """Token ids that start every prompt of a call, and their keys and values per layer ([1, heads,
    len(tokens), dim]; an empty list when there are no tokens)."""

    tokens: list[int]
    layers: list[tuple[torch.Tensor, torch.Tensor]]

    def cache(self, model, capacity: int) -> Cache:
        """A one-row cache of `capacity` positions holding this prefix."""
        prefill = self.layers or [None] * model.config.get_text_config().num_hidden_layers
        return Cache(layers=[_RowCache(capacity, kv) for kv in prefill])


# Tokens per forward pass when a prompt's own tokens run on top of a cache (see `_run_row`).
PREFILL_CHUNK = 256

# The last shared prefix computed per model: the few-shot part of the explainer prompt is the same
# for every neuron, so its keys and values are computed once per process and model.
_PREFIXES: "weakref.WeakKeyDictionary[torch.nn.Module, _Prefix]" = weakref.WeakKeyDictionary()


def _common_length(rows: list[list[int]]) -> int:
    """Length of the longest common prefix of the token rows."""
    first, shortest = rows[0], min(len(r) for r in rows)
    for i in range(shortest):
        if any(r[i] != first[i] for r in rows[1:]):
            return i
    return shortest


def _shared_prefix(model, prompts: list[list[int]]) -> _Prefix:
    """Keys and values of the prompts' longest common prefix, short of every prompt's last token
    (each row needs one token of its own to compute its first logits).

    Reuses what an earlier call stored for this model as far as it agrees, computes only the rest,
    and stores the result for the next call.
    """
    tokens = prompts[0][: min(_common_length(prompts), min(len(p) for p in prompts) - 1)]
    if not tokens:
        return _Prefix([], [])
    stored = _PREFIXES.get(model)
    known = _common_length([stored.tokens, tokens]) if stored else 0
    if known == len(tokens):
        return _Prefix(tokens, [(k[:, :, :known], v[:, :, :known]) for k, v in stored.layers])
    reused = _Prefix(tokens[:known], [(k[:, :, :known], v[:, :, :known]) for k, v in stored.layers] if known else [])
    cache = reused.cache(model, len(tokens))
    _run_row(model, tokens[known:], known, cache)
    prefix = _Prefix(tokens, [(layer.keys, layer.values) for layer in cache.layers])
    _PREFIXES[model] = prefix
    return prefix


def _last_logits(model, ids: torch.Tensor, positions: torch.Tensor, cache: Cache, attention_mask=None):
    """One forward pass of `ids` [rows, q] at `positions` on top of `cache`; the logits [rows, V] of
    the last position."""
    keep = {"logits_to_keep": 1} if _accepts(model, "logits_to_keep") else {}
    out = model(input_ids=ids, position_ids=positions, attention_mask=attention_mask, cache=cache, use_cache=True,
                **keep)
    return out.logits[:, -1]


def _run_row(model, tokens: list[int], start: int, cache: Cache) -> torch.Tensor:
    """One row's `tokens` at positions start, start + 1, ... on top of `cache`; logits [1, V] after them.

    In chunks of PREFILL_CHUNK tokens: on top of a cache, attention takes an explicit causal mask
    and then computes every query-key pair, the masked half of the new tokens' own triangle
    included; chunks bound that waste (about a quarter of the attention for a 1,500-token row on
    a 1,100-token prefix).
    """
    device = model.device
    for begin in range(0, len(tokens), PREFILL_CHUNK):
        chunk = tokens[begin : begin + PREFILL_CHUNK]
        positions = torch.arange(start + begin, start + begin + len(chunk), device=device)[None]
        logits = _last_logits(model, torch.tensor([chunk], device=device), positions, cache)
    return logits


def _decodes_rows_together(model) -> bool:
    """Whether a batch's rows decode as one batch, or one row at a time after each other.

    Rows of different lengths need a padding mask, and with a mask transformers' sdpa and eager
    attention repeat every cached key and value for each query head sharing it (grouped-query
    attention runs natively only without a mask). On a CPU those copies cost more than the batch
    saves: SmolLM2-135M, 8 rows of 2,700 tokens, one thread: ~2.2 s per step for the copies alone,
    against ~0.1 s per row and step one row at a time, where no mask is needed.
    """
    config = model.config.get_text_config()
    heads = getattr(config, "num_attention_heads", None)
    grouped = getattr(config, "num_key_value_heads", None) not in (None, heads)
    return model.device.type != "cpu" or not grouped


def _next_tokens(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """One token per row: argmax at temperature 0, else a draw from softmax(logits / temperature)
    restricted to the nucleus, the most probable tokens whose probability first reaches top_p (the
    reference sampling: no top-k, no penalties)."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    scores = logits.float() / temperature
    if top_p < 1.0:
        ordered, order = scores.sort(dim=-1, descending=True)
        probs = ordered.softmax(dim=-1)
        outside = probs.cumsum(dim=-1) - probs >= top_p  # the mass before a token already reaches top_p
        scores = scores.scatter(-1, order, ordered.masked_fill(outside, float("-inf")))
    return torch.multinomial(scores.softmax(dim=-1), 1)[:, 0]


def _answer_complete(tokenizer, eos_ids: list[int], new: list[int]) -> bool:
    """The answer ended (EOS) or its first non-empty line did: `clean_explanation` keeps only that
    line, so what follows would be generated for nothing."""
    return new[-1] in eos_ids or "\n" in tokenizer.decode(new, skip_special_tokens=True).lstrip()


def _prefill_rows(model, prefix: _Prefix, prompts: list[list[int]], capacity: int) -> tuple[Cache, torch.Tensor]:
    """A cache holding every prompt as one row each, and the logits [rows, V] after each prompt.

    Each prompt's own tokens run as a batch of one on a copy of the prefix cache: no padding, and
    on a CPU a long batched, padded prefill is slower than the same rows one after the other.
    """
    start = len(prefix.tokens)
    caches, logits = [], []
    for prompt in prompts:
        caches.append(prefix.cache(model, capacity))
        logits.append(_run_row(model, prompt[start:], start, caches[-1]))
    if len(caches) == 1:
        return caches[0], logits[0]
    return Cache(layers=[_RowCache.stacked(rows) for rows in zip(*(c.layers for c in caches))]), torch.cat(logits)


def _generate_rows(model, tokenizer, prefix: _Prefix, prompts, max_new_tokens, temperature, top_p, eos_ids):
    """New tokens for each prompt (all start with `prefix`), decoded as one batch; a row leaves the
    batch as soon as its answer is complete."""
    cache, logits = _prefill_rows(model, prefix, prompts, max(len(p) for p in prompts) + max_new_tokens)
    new = [[] for _ in prompts]
    active = list(range(len(prompts)))  # the prompt of each batch row
    while True:
        tokens = _next_tokens(logits, temperature, top_p)
        for row, token in zip(active, tokens.tolist()):
            new[row].append(token)
        going = [i for i, row in enumerate(active)
                 if len(new[row]) < max_new_tokens and not _answer_complete(tokenizer, eos_ids, new[row])]
        if not going:
            return new
        if len(going) < len(active):
            keep = torch.tensor(going, device=model.device)
            cache.batch_select_indices(keep)
            tokens, active = tokens[keep], [active[i] for i in going]
        lengths = torch.tensor(cache.layers[0].lengths, device=model.device)
        # Rows are right-padded: row i sees its own lengths[i] entries and the token it adds now.
        visible = torch.arange(int(lengths.max()) + 1, device=model.device)[None] <= lengths[:, None]
        logits = _last_logits(model, tokens[:, None], lengths[:, None], cache, attention_mask=visible)


def generate_texts(
    model,
    tokenizer,
    conversations: list[list[dict]],
    max_new_tokens: int = 60,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
    batch_size: int = 8,
) -> list[Answer]:
    """Generate one answer per conversation: its first non-empty line, or up to EOS or max_new_tokens.

    The prompts' common token prefix (the instruction and few-shot examples) is computed once and
    reused (also by later calls with the same model); each prompt's own tokens run on top of it,
    and up to `batch_size` rows of similar length decode together where the device makes that
    cheaper (see `_decodes_rows_together`). Generation of a row stops after the first line of its
    answer, the only part the explanation keeps.

    temperature 0 is greedy; otherwise sampling with `top_p`, reproducible for a given `seed` (the
    global RNG is seeded inside a fork, so callers' random state is untouched). Returns one Answer
    per conversation, in input order: the decoded new tokens without special tokens, with the full
    prompt length as tokens_in and the generated length up to and including the stop as tokens_out.
    """
    if not conversations:
        return []
    # Templates carry their own BOS; only the plain rendering asks the tokenizer for special tokens.
    special = not getattr(tokenizer, "chat_template", None)
    prompts = [tokenizer(chat_text(tokenizer, c), add_special_tokens=special)["input_ids"] for c in conversations]
    eos_ids = _eos_ids(model, tokenizer)
    # Similar lengths share a batch: less padding while decoding.
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    group = batch_size if _decodes_rows_together(model) else 1
    results = [None] * len(prompts)
    with torch.random.fork_rng(devices=_rng_devices(model.device)), torch.inference_mode():
        torch.manual_seed(seed)
        prefix = _shared_prefix(model, prompts)
        for begin in range(0, len(order), group):
            batch = order[begin : begin + group]
            rows = [prompts[i] for i in batch]
            generated = _generate_rows(model, tokenizer, prefix, rows, max_new_tokens, temperature, top_p, eos_ids)
            for i, new in zip(batch, generated):
                text = tokenizer.decode(new, skip_special_tokens=True)
                results[i] = Answer(text, Usage(tokens_in=len(prompts[i]), tokens_out=len(new)))
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


@dataclass(frozen=True)
class _Context:
    """Keys and values (per layer, batch of 1) of the `length` tokens every row of a batch starts with."""

    layers: list[tuple[torch.Tensor, torch.Tensor]]
    length: int


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
        self._prefix = _Context(self._encode_prefix(prefix_ids), self.prefix_tokens)

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

    def _batch_cache(self, n: int, context: "_Context | None" = None) -> DynamicCache:
        """A fresh cache holding `context` (default: the prefix) for `n` rows; the model appends to
        it in place, so every batch needs its own (the stored tensors are never modified)."""
        context = context or self._prefix
        if not context.layers:
            return DynamicCache()
        return DynamicCache([(k.expand(n, -1, -1, -1), v.expand(n, -1, -1, -1)) for k, v in context.layers])

    def _extend(self, text: str) -> "_Context":
        """The prefix followed by `text`, run once (batch of 1): what several sequences share after
        the prefix (a neuron's explanation) is then computed once for all of them."""
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        cache, start = self._batch_cache(1), self._prefix.length
        skip = {"logits_to_keep": 1} if self._keep_logits else {}
        self.model(input_ids=torch.tensor([ids], device=self.model.device),
                   position_ids=torch.arange(start, start + len(ids), device=self.model.device)[None],
                   cache=cache, use_cache=True, **skip)
        self.tokens_processed += len(ids)
        return _Context([(layer.keys, layer.values) for layer in cache.layers], start + len(ids))

    def _forward(self, keep: torch.Tensor | None = None, **inputs):
        """One model call; with `keep` (bool [B, Q]) only those positions get vocabulary logits,
        flattened to [N, V] in row-major order."""
        if keep is not None and self._keep_logits:
            return self.model(**inputs, use_cache=True, logits_to_keep=keep).logits
        logits = self.model(**inputs, use_cache=True).logits
        return logits if keep is None else logits[keep]

    # -- public API

    @torch.inference_mode()
    def simulate(self, sequences: list[list[str]], shared: str = "") -> list[np.ndarray]:
        """Per sequence, a float64 [T, 11] array of p(value 0..10) at each segment's end. `shared`:
        text every sequence starts with after the prefix, run once for all of them."""
        context = self._extend(shared) if shared else self._prefix
        encoded = [self._encode(seq, context.length) for seq in sequences]
        results: list[np.ndarray | None] = [np.zeros((0, 11)) if not r else None for _, r in encoded]
        # Batch similar lengths together: less padding, same results; batches of even size.
        todo = sorted((i for i, (_, r) in enumerate(encoded) if r), key=lambda i: len(encoded[i][0]))
        size = -(-len(todo) // max(1, -(-len(todo) // self.batch_size)))
        for start in range(0, len(todo), max(size, 1)):
            batch = todo[start : start + size]
            for i, probs in zip(batch, self._simulate_batch([encoded[i] for i in batch], context)):
                results[i] = probs
        return results

    @torch.inference_mode()
    def simulate_token_by_token(self, sequences: list[list[str]]) -> list[np.ndarray]:
        """The same [T, 11] arrays as `simulate`, computed by docs/method.md's "token by token" method:
        one forward call (batch of 1) per token on top of the cached prefix, feeding the segments
        up to and including token t and reading the next-token distribution at the last position.
        In chain mode the same call appends a "1" and also reads p("0") after it.

        The slow reference: the baseline of bench/simulation.py and a check of `simulate`.
        """
        device = self.model.device
        one = [self.value_ids[1]] if self.mode == "chain" else []
        results = []
        for segments in sequences:
            ids, reads = self._encode(segments)
            first = np.zeros((len(reads), len(self.value_ids)))
            zero_after_one = np.zeros(len(reads))
            for t, r in enumerate(reads):
                row = ids[: r + 1] + one
                keep = torch.zeros((1, len(row)), dtype=torch.bool)
                keep[0, r:] = True  # the read position, and in chain mode the "1" after it
                logits = self._forward(
                    input_ids=torch.tensor([row], device=device), cache=self._batch_cache(1), keep=keep.to(device)
                )
                self.tokens_processed += len(row)
                probs = self._value_probs(logits)
                first[t], zero_after_one[t] = probs[0], probs[-1, 0]
            results.append(value_distribution(first, zero_after_one if self.mode == "chain" else None))
        return results

    # -- one batch

    def _encode(self, segments: list[str], start: int | None = None) -> tuple[list[int], list[int]]:
        """Token ids of the concatenated segments and the index of each segment's last token;
        `start`: the tokens before them (default: the prefix's)."""
        start = self.prefix_tokens if start is None else start
        if not segments:
            return [], []
        pieces = self.tokenizer(list(segments), add_special_tokens=False)["input_ids"]
        ids, reads = [], []
        for i, piece in enumerate(pieces):
            if not piece:
                raise ValueError(f"segment {i} ({segments[i]!r}) has no tokens: it has no read position")
            ids.extend(piece)
            reads.append(len(ids) - 1)
        needed = start + len(ids) + (self.mode == "chain")
        if self._max_positions is not None and needed > self._max_positions:
            raise ValueError(
                f"prompt of {needed} tokens (prefix {start}) exceeds the simulator's "
                f"context of {self._max_positions} tokens"
            )
        return ids, reads

    def _simulate_batch(self, batch: list[tuple[list[int], list[int]]], context: "_Context") -> list[np.ndarray]:
        """Main pass over the right-padded batch after `context`, plus the chain pass for p(10) if needed."""
        P, device = context.length, self.model.device
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
        cache = self._batch_cache(n, context)
        logits = self._forward(input_ids=ids.to(device), attention_mask=attention.to(device),
                               position_ids=positions.to(device), cache=cache, keep=keep.to(device))
        self.tokens_processed += sum(len(row) for row, _ in batch)
        probs = self._value_probs(logits)  # [N, 10 or 11], N = all read positions, row-major
        per_row = np.split(probs, np.cumsum([len(reads) for _, reads in batch])[:-1])
        if self.mode == "direct":
            return per_row
        zeros = self._chain_zero_probs(batch, cache, width, P)
        return [value_distribution(d, z) for d, z in zip(per_row, zeros)]

    def _value_probs(self, logits: torch.Tensor) -> np.ndarray:
        """Softmax over the full vocabulary, then the value tokens' probabilities (float64)."""
        logp = torch.log_softmax(logits.float(), dim=-1)[:, self.value_ids]
        return logp.double().exp().cpu().numpy()

    # -- chain mode: p("0" | ... read position, "1")

    def _chain_zero_probs(self, batch, cache: DynamicCache, width: int, P: int) -> list[np.ndarray]:
        """z at every read position of the batch (after P cached tokens): the probability of "0"
        right after a "1" written at that position."""
        self.tokens_processed += sum(len(reads) for _, reads in batch)
        if self._custom_mask:
            return self._chain_one_pass(batch, cache, width, P)
        return self._chain_per_position(batch, cache, width, P)

    def _chain_one_pass(self, batch, cache: DynamicCache, width: int, P: int) -> list[np.ndarray]:
        """All z of the batch in one forward pass: after the cached prefix + sequence, append one
        "1" per read position; a custom 4D mask lets extra token j see only the prefix, the
        sequence up to and including its read position, and itself, at position id read + 1."""
        device, dtype = self.model.device, self.model.dtype
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
        logits = self._forward(input_ids=ones.to(device), attention_mask=mask.to(device),
                               position_ids=positions.to(device), cache=cache, keep=keep.to(device))
        z = self._value_probs(logits)[:, 0]
        return np.split(z, np.cumsum([len(reads) for _, reads in batch])[:-1])

    def _chain_per_position(self, batch, cache: DynamicCache, width: int, P: int) -> list[np.ndarray]:
        """Fallback for attention that cannot take a custom 4D mask: one forward of a single "1"
        per row for each read index j, with an ordinary 2D mask hiding the sequence after read
        position j; the cache is cropped back after each step. Correct but T times the calls."""
        device = self.model.device
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

