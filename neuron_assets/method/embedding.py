"""The embedding scorer (delphi's): how close an explanation sits to the excerpts a neuron fires
on, against excerpts it ignores, in the space of a sentence-embedding model. No judge, no LLM:
one forward pass of a small encoder per excerpt and per explanation.

Vectors come from the encoder's last hidden states: mean over the tokens of the attention mask,
then scaled to unit length, so a dot product is a cosine similarity. The score of an explanation is
the AUROC of its cosine similarity to each excerpt, positives (the neuron's top records) against
negatives (random and hard negatives).
"""

import numpy as np


def mean_pool(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Per sequence the mean of its token vectors over the attention mask:
    v_b = sum_t m_bt h_bt / sum_t m_bt, for hidden [B, T, D] and mask [B, T] of 0/1. A sequence
    with no token in its mask gets the zero vector."""
    hidden = np.asarray(hidden, np.float64)
    mask = np.asarray(mask, np.float64)[:, :, None]
    return (hidden * mask).sum(axis=1) / np.maximum(mask.sum(axis=1), 1.0)


def unit_length(vectors: np.ndarray) -> np.ndarray:
    """Each row v / ||v||_2 (a zero row stays zero)."""
    vectors = np.asarray(vectors, np.float64)
    norms = np.linalg.norm(vectors, axis=-1, keepdims=True)
    return vectors / np.where(norms > 0, norms, 1.0)


def cosine_similarities(query: np.ndarray, items: np.ndarray) -> np.ndarray:
    """cos(q, x_i) = q . x_i / (||q|| ||x_i||) for query [D] and items [N, D]: [N]. A zero vector's
    similarity is 0."""
    return unit_length(np.asarray(items)) @ unit_length(np.asarray(query))


def auroc(positives, negatives) -> float:
    """Area under the ROC curve of scores that should be higher for positives, in its Mann-Whitney
    form: the probability that a random positive scores above a random negative, ties counting 1/2,

        AUROC = (1 / (P N)) sum_i sum_j [ 1(p_i > n_j) + 1/2 1(p_i = n_j) ],

    over the P positive scores p_i and the N negative scores n_j. 1 separates perfectly, 0.5 is
    chance, 0 is perfectly inverted. NaN when either class is empty."""
    p = np.asarray(positives, np.float64).reshape(-1, 1)
    n = np.asarray(negatives, np.float64).reshape(1, -1)
    if p.size == 0 or n.size == 0:
        return float("nan")
    return float(((p > n).sum() + 0.5 * (p == n).sum()) / (p.size * n.size))


def embedding_aurocs(explanation: np.ndarray, excerpts: np.ndarray, kinds: list[str]) -> dict[str, float]:
    """AUROC of cos(explanation, excerpt) for telling the positives from all negatives ("all"), from
    the random negatives ("random") and from the hard negatives ("hard_negative"); `kinds` names
    each row of `excerpts` [N, D]: "positive", "random" or "hard_negative". NaN where a class is
    empty."""
    if len(kinds) != len(excerpts):
        raise ValueError(f"{len(excerpts)} excerpt vectors but {len(kinds)} kinds")
    similarity = cosine_similarities(explanation, excerpts) if len(kinds) else np.zeros(0)
    kinds = np.asarray(kinds, dtype=str)
    positive = similarity[kinds == "positive"]
    return {"all": auroc(positive, similarity[kinds != "positive"]),
            "random": auroc(positive, similarity[kinds == "random"]),
            "hard_negative": auroc(positive, similarity[kinds == "hard_negative"])}
