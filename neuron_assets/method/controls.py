"""Shuffled controls: a layer's explanations given to the wrong neurons (a floor for every variant).

A score only means something next to what an unrelated explanation of the same kind reaches on
the same neuron with the same simulator: the shuffled control of a variant gives each neuron the
explanation another neuron received, and is scored exactly like the variant itself.
"""

import numpy as np

SUFFIX = "_shuffled"


def control_of(variant: str) -> str:
    """The name of a variant's shuffled control, e.g. llm -> llm_shuffled."""
    return variant + SUFFIX


def is_control(variant: str) -> bool:
    return variant.endswith(SUFFIX)


def controlled(variant: str) -> str:
    """The variant a control belongs to, e.g. llm_shuffled -> llm."""
    return variant.removesuffix(SUFFIX)


def donors(n: int, seed: int) -> list[int]:
    """A seeded derangement: donors(n)[i] != i for every i, so no neuron keeps its own explanation.

    Draw a random order o of 0..n-1 and let o[k] take the explanation of o[k+1] (cyclically): one
    cycle through all n items, so every item gets another's. Needs n >= 2.
    """
    if n < 2:
        raise ValueError(f"a shuffled control needs at least 2 explanations, got {n}")
    order = np.random.default_rng(seed).permutation(n)
    out = [0] * n
    for k in range(n):
        out[order[k]] = int(order[(k + 1) % n])
    return out
