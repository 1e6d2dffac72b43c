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
