"""The token explorer: which explained neurons fire on each token of a text.

`explained_neurons` turns score tables into one explanation per neuron, `top_explained` picks, per
token and layer, the most active of those neurons (pure: arrays and tables in, lists out), and
`run_text` / `run_windows` get the activations from the subject model in one forward pass for all
layers (`SubjectModel.unit_activations`, the code neuron_records uses). `neuron-assets explore
TEXT` prints the result; the neuron_viewer_index asset shows it for a few corpus excerpts.
No Dagster import: `storage` and `subject_model` are any objects with the methods used.
"""

from __future__ import annotations

import math

import numpy as np
import polars as pl

from neuron_assets.stages.variants import CONTROL_ROWS

EXPLAINED_SCHEMA = {"layer": pl.Int32, "unit": pl.Int32, "variant": pl.String, "explanation": pl.String,
                    "score_all": pl.Float64, "max_activation": pl.Float64}


def explained_neurons(scores: pl.DataFrame, stats: pl.DataFrame | None = None) -> pl.DataFrame:
    """One row per (layer, neuron) that has an explanation in `scores`: the explanation of its real
    variant (controls, `*_shuffled`, left out) with the highest score_all (NaN scores after finite
    ones; ties: llm first, then by variant name). `max_activation` is the neuron's over the corpus
    (`stats`: layer, neuron, max_activation), null where unknown."""
    rows = scores.filter(~CONTROL_ROWS & pl.col("explanation").is_not_null()
                         & (pl.col("explanation").str.strip_chars() != ""))
    rows = (rows.with_columns(pl.col("score_all").fill_nan(None).alias("_score"),
                              (pl.col("variant") != "llm").alias("_not_llm"))
            .sort(["layer", "unit", "_score", "_not_llm", "variant"],
                  descending=[False, False, True, False, False], nulls_last=True)
            .unique(["layer", "unit"], keep="first", maintain_order=True)
            .select("layer", "unit", "variant", "explanation", "score_all"))
    if stats is not None and stats.height:
        rows = rows.join(stats.select(pl.col("layer").cast(pl.Int32), pl.col("unit").cast(pl.Int32),
                                      pl.col("max_activation").cast(pl.Float64)),
                         on=["layer", "unit"], how="left")
    else:
        rows = rows.with_columns(max_activation=pl.lit(None, dtype=pl.Float64))
    return rows.select([pl.col(c).cast(t) for c, t in EXPLAINED_SCHEMA.items()])


def top_explained(activations: dict[int, np.ndarray], explained: pl.DataFrame, top: int = 3,
                  min_activation: float = 0.0) -> list[list[dict]]:
    """Per token, for each layer of `activations` ({layer: [tokens, neurons]}) that has explained
    neurons, the `top` explained neurons with the highest activation relative to their
    max_activation (over the corpus; the raw activation where it is unknown), among those whose
    activation exceeds `min_activation`. Ties: lower neuron first.

    Returns, per token, hits in layer order then rank order: {layer, neuron, activation, relative,
    variant, explanation, score_all}."""
    if top < 1:
        raise ValueError(f"top must be at least 1, got {top}")
    lengths = {len(a) for a in activations.values()}
    if len(lengths) > 1:
        raise ValueError(f"the layers' activations cover different numbers of tokens: {sorted(lengths)}")
    n_tokens = lengths.pop() if lengths else 0
    out: list[list[dict]] = [[] for _ in range(n_tokens)]
    for layer in sorted(activations):
        rows = explained.filter(pl.col("layer") == layer).sort("unit")
        if rows.height == 0:
            continue
        acts = np.asarray(activations[layer], dtype=np.float64)
        neurons = rows["unit"].to_numpy()
        if neurons.max() >= acts.shape[1]:
            raise ValueError(f"layer {layer}: neuron {neurons.max()} is explained but the model has {acts.shape[1]}")
        max_activation = rows["max_activation"].fill_null(float("nan")).to_numpy().astype(np.float64)
        max_activation = np.where(np.isfinite(max_activation) & (max_activation > 0), max_activation, 1.0)
        a = acts[:, neurons]  # [T, K]
        relative = a / max_activation
        info = rows.select("variant", "explanation", "score_all").rows()
        for t in range(n_tokens):
            active = np.flatnonzero(a[t] > min_activation)
            # stable sort on -relative keeps the lower neuron first among ties
            ranked = active[np.argsort(-relative[t, active], kind="stable")][:top]
            for k in ranked:
                variant, explanation, score = info[k]
                out[t].append({"layer": layer, "unit": int(neurons[k]), "activation": float(a[t, k]),
                               "relative": float(relative[t, k]), "variant": variant, "explanation": explanation,
                               "score_all": score})
    return out


def load_explained(storage, layer_keys: list[str], shard_keys: list[str]) -> pl.DataFrame:
    """`explained_neurons` over every scores partition present under `storage` (only those that
    exist are read), with the max activations from each layer's neuron_records stats where present."""
    tables, stats = [], []
    for layer in layer_keys:
        present = [f"{layer}|{s}" for s in shard_keys if storage.exists("scores", f"{layer}|{s}")]
        if not present:
            continue
        tables += [storage.read("scores", p, columns=["layer", "unit", "variant", "explanation", "score_all"])
                   for p in present]
        if storage.exists("neuron_records", layer, "stats"):
            stats.append(storage.read("neuron_records", layer, "stats", columns=["unit", "max_activation"])
                         .with_columns(layer=pl.lit(int(layer), dtype=pl.Int32)))
    if not tables:
        return pl.DataFrame(schema=EXPLAINED_SCHEMA)
    return explained_neurons(pl.concat(tables, how="diagonal_relaxed"), pl.concat(stats) if stats else None)


def run_windows(subject_model, token_ids: np.ndarray, layers: list[int]) -> dict[int, np.ndarray]:
    """{layer: [windows, tokens, neurons]} for windows of token ids, every layer from one forward
    pass per batch."""
    parts: dict[int, list[np.ndarray]] = {layer: [] for layer in layers}
    for _, acts in subject_model.unit_activations(np.asarray(token_ids), layers):
        for layer in layers:
            parts[layer].append(acts[layer])
    return {layer: np.concatenate(chunks) for layer, chunks in parts.items()}


def tokenize(tokenizer, text: str, max_tokens: int) -> tuple[list[int], list[str]]:
    """Token ids of `text` as the corpus is tokenized (no special tokens), at most `max_tokens`,
    and each token decoded on its own."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][:max_tokens]
    return ids, [tokenizer.decode([i]) for i in ids]


def run_text(subject_model, text: str, layers: list[int]) -> tuple[list[str], dict[int, np.ndarray]]:
    """The tokens of `text` and {layer: activations [tokens, neurons]}, from one forward pass."""
    ids, tokens = tokenize(subject_model.tokenizer(), text, subject_model.shape().context)
    if not ids:
        raise ValueError("the text has no tokens")
    acts = run_windows(subject_model, np.asarray([ids]), layers)
    return tokens, {layer: a[0] for layer, a in acts.items()}


def shown_token(token: str) -> str:
    """A token on one terminal line: tab, newline and carriage return as ⇥ ↵ ␍."""
    return token.replace("\t", "\u21e5").replace("\n", "\u21b5").replace("\r", "\u240d")


def format_hits(tokens: list[str], hits: list[list[dict]], layer_key=str) -> str:
    """The CLI's text: a line per token, then a line per hit (layer, neuron, activation, score_all,
    explanation)."""
    lines = []
    for i, (token, found) in enumerate(zip(tokens, hits)):
        lines.append(f"{i:>4}  {shown_token(token)!r}" + ("" if found else "  -"))
        for h in found:
            score = h["score_all"]
            score = "nan" if score is None or (isinstance(score, float) and math.isnan(score)) else f"{score:.3f}"
            lines.append(f"        layer {layer_key(h['layer'])} unit {h['unit']:<5} act {h['activation']:8.3f}  "
                         f"score_all {score:>6}  {h['explanation']}")
    return "\n".join(lines)
