"""Tiny random-weight causal LMs and tokenizers, built in-process so that tests never download.

`build_tiny_model("llama" | "gpt2" | "gpt_neox", path)` writes a model directory that
`AutoModelForCausalLM.from_pretrained(path)` and `AutoTokenizer.from_pretrained(path)` load offline.
The tokenizer is a byte-level BPE trained on a few KB of Python documentation: like SmolLM2 and
Llama tokenizers it splits numbers into single digits, so "10" is two tokens; pass
`ten_is_one_token=True` for a tokenizer where "10" is one token.
"""

import pathlib

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    PreTrainedTokenizerFast,
)

EOS = "<|endoftext|>"
BOS = "<|bos|>"
TOPICS = ["assert", "assignment", "async", "booleans", "break", "calls", "class", "for", "if", "while"]
ARCHES = ("llama", "gpt2", "gpt_neox")


def _training_text() -> list[str]:
    """A few KB of English and code, plus activation lines like the prompts contain."""
    from pydoc_data.topics import topics

    docs = [topics[name][:1500] for name in TOPICS]
    # token<TAB>value lines make "\t", digits and "unknown" frequent, as in simulator prompts;
    # many "10"s let the no-digit-split variant learn the merge "1" + "0".
    docs.append("".join(f"word\t{v}\nthe\tunknown\n" for v in range(11)) * 3)
    docs.append("10 10 10 10\t10\n" * 20)
    return docs


def build_tokenizer(path, ten_is_one_token: bool = False, add_bos: bool = False, vocab_size: int = 512):
    """Train a byte-level BPE tokenizer (~`vocab_size` tokens) and save it to `path`.

    Digits are single tokens. With `ten_is_one_token=False` (the default, like SmolLM2 / Llama) every
    number is split into digits; otherwise digit runs stay together and "10" is learned as one token.
    `add_bos=True` makes the tokenizer prepend a BOS token when asked for special tokens, like Llama.
    """
    tok = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if ten_is_one_token:
        tok.pre_tokenizer = byte_level
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    tok.decoder = decoders.ByteLevel()
    specials = [EOS, BOS]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_training_text(), trainer=trainer)
    if add_bos:
        bos_id = tok.token_to_id(BOS)
        tok.post_processor = processors.TemplateProcessing(
            single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
        )
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=BOS)
    path = pathlib.Path(path)
    path.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(path)
    return fast


def _config(arch: str, vocab: int, n_layers: int, hidden: int, intermediate: int, max_positions: int, bos: int, eos: int):
    """A small config; a large init range makes the random model's distributions peaked, so that
    a wrong mask or position id changes probabilities far beyond test tolerances."""
    common = dict(vocab_size=vocab, bos_token_id=bos, eos_token_id=eos, initializer_range=0.3)
    if arch == "llama":
        return LlamaConfig(
            hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=n_layers,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_positions,
            tie_word_embeddings=False, **common,
        )
    if arch == "gpt2":
        return GPT2Config(
            n_embd=hidden, n_inner=intermediate, n_layer=n_layers, n_head=4, n_positions=max_positions, **common
        )
    if arch == "gpt_neox":
        return GPTNeoXConfig(
            hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=n_layers,
            num_attention_heads=4, max_position_embeddings=max_positions, rotary_pct=0.5, **common,
        )
    raise ValueError(f"unknown arch {arch!r}; expected one of {ARCHES}")


def build_tiny_model(
    arch: str,
    path,
    n_layers: int = 2,
    hidden: int = 32,
    intermediate: int = 64,
    seed: int = 0,
    max_positions: int = 256,
    ten_is_one_token: bool = False,
) -> pathlib.Path:
    """Save a random-weight `arch` model and its tokenizer to `path`; return the path.

    The Llama variant's tokenizer prepends BOS (as Llama tokenizers do); the others add nothing.
    """
    path = pathlib.Path(path)
    tok = build_tokenizer(path, ten_is_one_token=ten_is_one_token, add_bos=arch == "llama")
    config = _config(
        arch, len(tok), n_layers, hidden, intermediate, max_positions, tok.bos_token_id, tok.eos_token_id
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(path)
    return path


# --- a subject model with known neurons -----------------------------------------------------------

WORD_CHARS = r"[0-9A-Za-z_]"


def _variant_ids(tokenizer, word: str) -> list[int]:
    """The token id of `word` (asserted to be one token) and of every other vocabulary entry that
    decodes to the same text once whitespace is stripped (" the" and "the")."""
    ids = tokenizer(word, add_special_tokens=False)["input_ids"]
    assert len(ids) == 1, f"{word!r} is {len(ids)} tokens of the tiny tokenizer, not one: {ids}"
    target = word.strip()
    assert target, f"{word!r} is whitespace only"
    same = [i for i in range(len(tokenizer)) if i != ids[0] and tokenizer.decode([i]).strip() == target]
    return ids + same


def build_token_neuron_model(
    path,
    words: list[str],
    *,
    hidden: int = 64,
    intermediate: int = 64,
    n_layers: int = 2,
    max_positions: int = 256,
    seed: int = 0,
    strength: float = 6.0,
    bias: float = 2.0,
) -> tuple[pathlib.Path, dict[int, str]]:
    """A tiny GPT-2 whose layer-0 MLP neuron i fires on the token `words[i]` and nowhere else.

    The activation (input of `h[0].mlp.c_proj`, gelu(c_fc(ln_2(h)))) of neuron i is about
    gelu(`strength`) on the word and exactly gelu(-`bias`) (~ -0.05) on every other token,
    whatever the context. A word fires on every token that strips to the same text (" the" and
    "the"); `words[i]` itself must be one token. An item "a|b" fires strongly on a and about half
    as strongly on b. Other neurons and layer 1 keep their random weights.

    Construction: per distinct word, two residual dimensions (p, q) are reserved. The embedding writes
    +L at p and -L at q for that word's tokens and 0 at p and q for every other token; position
    embeddings and the layer-0 attention output (c_proj weight columns and bias) write nothing
    there, so in layer 0's MLP input p and q are nonzero only on the word's tokens. ln_2 divides
    by the row's std and subtracts its mean; reading z_p - z_q cancels the mean, giving exactly 0
    off the word and 2L / std ~ sqrt(2 * hidden) on it (L dominates the std). c_fc column i reads
    w * (z_p - z_q) - bias, with w set so that the pre-activation on the word is `strength`
    (half of it for the second word of "a|b").

    Returns the path and {neuron index: words[i]}.
    """
    path = pathlib.Path(path)
    tok = build_tokenizer(path)
    config = _config("gpt2", len(tok), n_layers, hidden, intermediate, max_positions, tok.bos_token_id, tok.eos_token_id)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    items = [w.split("|") for w in words]
    distinct = list(dict.fromkeys(part.strip() for parts in items for part in parts))
    assert len(words) <= intermediate, "more words than MLP neurons"
    assert 4 * len(distinct) <= hidden, f"{len(distinct)} words need {2 * len(distinct)} of {hidden} residual dims; raise hidden"
    L = 100.0
    # One (p, q) pair per distinct word, so a token has at most one: on it the row is L, -L and
    # small values, and z_p - z_q = 2L / std(row) ~ sqrt(2 * hidden).
    s = (2 * hidden) ** 0.5
    pairs = {word: (hidden - 1 - 2 * k, hidden - 2 - 2 * k) for k, word in enumerate(distinct)}
    block = model.transformer.h[0]
    with torch.no_grad():
        wte, wpe = model.transformer.wte.weight, model.transformer.wpe.weight
        attn_w, attn_b = block.attn.c_proj.weight, block.attn.c_proj.bias  # Conv1D: [in, out]
        fc_w, fc_b = block.mlp.c_fc.weight, block.mlp.c_fc.bias
        block.ln_2.weight.fill_(1.0)
        block.ln_2.bias.fill_(0.0)
        for p, q in pairs.values():
            for d in (p, q):
                wte[:, d] = 0.0
                wpe[:, d] = 0.0
                attn_w[:, d] = 0.0
                attn_b[d] = 0.0
        for parts in items:
            for word in parts:
                p, q = pairs[word.strip()]
                for token_id in _variant_ids(tok, word):
                    wte[token_id, p], wte[token_id, q] = L, -L
        for neuron, parts in enumerate(items):
            fc_w[:, neuron] = 0.0
            fc_b[neuron] = -bias
            for k, word in enumerate(parts):
                p, q = pairs[word.strip()]
                w = ((strength if k == 0 else strength / 2) + bias) / s
                fc_w[p, neuron], fc_w[q, neuron] = w, -w
    model.save_pretrained(path)
    return path, dict(enumerate(words))


def word_fires(tokens: list[str], word: str) -> list[bool]:
    """Per token: does a neuron of `build_token_neuron_model` for `word` fire there?"""
    return [t.strip() == word.strip() for t in tokens]


def frequent_words(
    model_path,
    corpus_path,
    seq_len: int = 16,
    max_windows: int = 120,
    n: int = 3,
    min_windows: int = 20,
    max_fraction: float = 0.6,
    max_disagreements: int = 3,
) -> list[str]:
    """`n` single-token words (" the"-like: a space then letters) for `build_token_neuron_model`,
    most frequent first, each present in at least `min_windows` and at most `max_fraction` of the
    corpus's windows (cut as the pipeline cuts them), and each nearly safe for text-level judges:
    in at most `max_disagreements` windows does "a token of the word is present" (the neuron
    fires) differ from "the text holds the word as a whole word" (what a detection judge sees;
    " the" + "re" is "there"). Raises if fewer than `n` qualify."""
    import json
    import re

    from transformers import AutoTokenizer

    from neuron_assets.resources.corpus import token_windows

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    documents = []
    for i, line in enumerate(pathlib.Path(corpus_path).read_text(encoding="utf-8").splitlines()):
        if line.strip():
            documents.append((str(i), json.loads(line)["text"]))
    windows = token_windows(tokenizer, documents, seq_len, max_windows)["tokens"]
    candidates = sorted({t for w in windows for t in w if re.fullmatch(r" [A-Za-z]+", t)})
    chosen = []
    for word in candidates:
        fires = [any(word_fires(w, word)) for w in windows]
        pattern = re.compile(rf"(?<!{WORD_CHARS}){re.escape(word.strip())}(?!{WORD_CHARS})")
        occurs = [bool(pattern.search("".join(w))) for w in windows]
        n_fire = sum(fires)
        disagreements = sum(f != o for f, o in zip(fires, occurs))
        if disagreements <= max_disagreements and min_windows <= n_fire <= max_fraction * len(windows):
            chosen.append((-n_fire, word))
    if len(chosen) < n:
        raise ValueError(f"only {len(chosen)} words qualify ({[w for _, w in sorted(chosen)]}); wanted {n}")
    return [w for _, w in sorted(chosen)[:n]]
