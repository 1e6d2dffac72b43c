"""The embedding scorer's math on hand-computed values: AUROC in its Mann-Whitney form, cosine
similarity, mean pooling over the attention mask."""

import math

import numpy as np
import pytest

from neuron_assets.method.embedding import auroc, cosine_similarities, embedding_aurocs, mean_pool, unit_length


def test_auroc_counts_pairs_won_and_ties_as_half():
    # pairs (p, n): (3,1) (3,2) (3,3)=1/2 (2,1) (2,2)=1/2 (2,3)=0 -> (1 + 1 + 0.5 + 1 + 0.5 + 0) / 6
    assert auroc([3, 2], [1, 2, 3]) == pytest.approx(4 / 6)
    assert auroc([5, 6], [1, 2]) == 1.0
    assert auroc([1, 2], [5, 6]) == 0.0
    assert auroc([1, 1], [1, 1, 1]) == 0.5  # all ties: chance
    assert auroc([0.9], [0.1, 0.95]) == 0.5


def test_auroc_of_an_empty_class_is_nan():
    assert math.isnan(auroc([], [1.0, 2.0]))
    assert math.isnan(auroc([1.0], []))


def test_cosine_similarity():
    items = np.array([[1.0, 0.0], [0.0, 2.0], [-3.0, 0.0], [1.0, 1.0], [0.0, 0.0]])
    assert cosine_similarities(np.array([2.0, 0.0]), items) == pytest.approx([1, 0, -1, 1 / math.sqrt(2), 0])


def test_mean_pool_averages_only_the_masked_tokens_and_unit_length_scales_to_one():
    hidden = np.array([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]],
                       [[2.0, 0.0], [7.0, 7.0], [7.0, 7.0]]])
    mask = np.array([[1, 1, 0], [1, 0, 0]])
    assert mean_pool(hidden, mask) == pytest.approx(np.array([[2.0, 3.0], [2.0, 0.0]]))
    assert unit_length(np.array([[3.0, 4.0], [0.0, 0.0]])) == pytest.approx(np.array([[0.6, 0.8], [0.0, 0.0]]))


def test_embedding_aurocs_per_kind_of_negative():
    explanation = np.array([1.0, 0.0])
    # cosines with the explanation: positives 1 and 0.6; random 0 and -1; hard negative 0.8
    excerpts = np.array([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0], [-1.0, 0.0], [0.8, 0.6]])
    kinds = ["positive", "positive", "random", "random", "hard_negative"]
    assert embedding_aurocs(explanation, excerpts, kinds) == pytest.approx(
        {"all": 5 / 6, "random": 1.0, "hard_negative": 0.5})
    without_hard = embedding_aurocs(explanation, excerpts[:4], kinds[:4])
    assert without_hard["random"] == without_hard["all"] == 1.0 and math.isnan(without_hard["hard_negative"])
    with pytest.raises(ValueError, match="5 excerpt vectors but 4 kinds"):
        embedding_aurocs(explanation, excerpts, kinds[:4])
