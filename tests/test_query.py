"""Query maths on hand-made features."""

from __future__ import annotations

import math

import pytest
import torch

from dfield.errors import QueryError
from dfield.query.sets import QuerySet, click_embedding, cosine_selection, patch_embedding


def test_softmax_probability_matches_hand_computation():
    pos = torch.tensor([[1.0, 0.0]])
    neg = torch.tensor([[0.0, 1.0]])
    qs = QuerySet(pos, neg, temperature=0.5)
    f = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    p = qs.probability(f)
    e = math.exp(1 / 0.5)
    assert p[0].item() == pytest.approx(e / (e + 1))
    assert p[1].item() == pytest.approx(1 / (e + 1))
    assert p[2].item() == pytest.approx(0.5)


def test_several_positives_add_up_and_no_negatives_gives_one():
    qs = QuerySet(torch.eye(3)[:2], torch.eye(3)[2:], temperature=0.1)
    assert qs.probability(torch.tensor([0.0, 0.0, 1.0])).item() < 1e-3
    assert QuerySet(torch.eye(3)[:1]).probability(torch.randn(5, 3)).allclose(torch.ones(5))


def test_bad_query_sets():
    with pytest.raises(QueryError):
        QuerySet(torch.zeros(0, 4))
    with pytest.raises(QueryError):
        QuerySet(torch.ones(1, 4), torch.ones(1, 3))
    with pytest.raises(QueryError):
        QuerySet(torch.ones(1, 4), temperature=0)


def test_cosine_threshold():
    f = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]])
    assert cosine_selection(f, torch.tensor([2.0, 0.0]), 0.7).tolist() == [True, True, False]


def test_patch_and_click_on_a_coarser_map():
    fmap = torch.arange(16, dtype=torch.float32).reshape(4, 4, 1)  # 4x4 map over a 40x40 image
    assert patch_embedding(fmap, (0, 0, 20, 20), (40, 40)).item() == pytest.approx((0 + 1 + 4 + 5) / 4)
    assert patch_embedding(fmap, (31, 31, 32, 32), (40, 40)).item() == 15  # a tiny box takes its cell
    assert click_embedding(fmap, (15, 25), (40, 40)).item() == 9
    with pytest.raises(QueryError, match="outside"):
        click_embedding(fmap, (40, 3), (40, 40))
    with pytest.raises(QueryError, match="not inside"):
        patch_embedding(fmap, (10, 10, 5, 20), (40, 40))


def test_center_removes_a_shared_component():
    shared = torch.tensor([10.0, 10.0, 0.0, 0.0])
    pos, neg = shared + torch.tensor([0, 0, 1.0, 0]), shared + torch.tensor([0, 0, 0, 1.0])
    f = torch.stack([shared + torch.tensor([0, 0, 0.9, 0.1]), shared + torch.tensor([0, 0, 0.1, 0.9])])
    plain = QuerySet(pos[None], neg[None], temperature=0.1).probability(f)
    centred = QuerySet(pos[None], neg[None], temperature=0.1, center=shared).probability(f)
    assert (plain - 0.5).abs().max() < 0.05  # every cosine is ~1: no contrast
    assert centred[0] > 0.99 and centred[1] < 0.01
