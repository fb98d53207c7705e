"""MuST equations (eq. 2, 3, 5) against values computed by hand."""

import math

import pytest
import torch

from nnunet_ssl.methods.must.losses import (
    multiscale_consistency_loss,
    semi_supervised_objective,
    sharpen,
    sharpen_regions,
)


def test_sharpen_matches_eq2_by_hand():
    # two classes, probabilities (0.75, 0.25), T = 0.5: 0.75^2 / (0.75^2 + 0.25^2) = 0.5625 / 0.625 = 0.9
    p = torch.tensor([[0.75], [0.25]])[None]  # (B=1, C=2, 1 voxel)
    out = sharpen(p, 0.5)
    assert torch.allclose(out[0, :, 0], torch.tensor([0.9, 0.1]))


def test_sharpen_three_classes_t08():
    p = torch.tensor([0.5, 0.3, 0.2]).view(1, 3, 1, 1)
    powered = [0.5 ** 1.25, 0.3 ** 1.25, 0.2 ** 1.25]
    expected = torch.tensor([v / sum(powered) for v in powered])
    assert torch.allclose(sharpen(p, 0.8).flatten(), expected, atol=1e-7)
    # sharpening of a softmax equals a softmax of logits / T
    logits = torch.randn(2, 4, 3, 3)
    assert torch.allclose(sharpen(torch.softmax(logits, 1), 0.8), torch.softmax(logits / 0.8, 1), atol=1e-6)


def test_sharpen_regions_against_complement():
    p = torch.tensor([0.8]).view(1, 1, 1)
    # (0.8^2) / (0.8^2 + 0.2^2) = 0.64 / 0.68
    assert torch.allclose(sharpen_regions(p, 0.5), torch.tensor(0.64 / 0.68).view(1, 1, 1))
    logits = torch.randn(2, 3, 4, 4)
    assert torch.allclose(sharpen_regions(torch.sigmoid(logits), 0.7), torch.sigmoid(logits / 0.7), atol=1e-6)


def test_multiscale_consistency_by_hand():
    # scale 0: one voxel, teacher logits (0, 0) -> p = (0.5, 0.5), sharpening keeps it; student logits (ln 3, 0)
    # -> q = (0.75, 0.25); mse = ((0.25)^2 + (0.25)^2) / 2 = 0.0625
    t0 = torch.zeros(1, 2, 1)
    s0 = torch.tensor([[[math.log(3.0)], [0.0]]])
    # scale 1: teacher logits (ln 3, 0) -> (0.75, 0.25), T = 0.5 -> (0.9, 0.1); student (0, 0) -> (0.5, 0.5)
    # mse = (0.4^2 + 0.4^2) / 2 = 0.16
    t1 = torch.tensor([[[math.log(3.0)], [0.0]]])
    s1 = torch.zeros(1, 2, 1)
    summed = multiscale_consistency_loss([t0, t1], [s0, s1], temperature=0.5, scale_reduction="sum")
    assert summed.item() == pytest.approx(0.0625 + 0.16, abs=1e-6)
    # the default divides by the number of scales (nnU-Net's deep-supervision weights sum to 1)
    mean = multiscale_consistency_loss([t0, t1], [s0, s1], temperature=0.5)
    assert mean.item() == pytest.approx((0.0625 + 0.16) / 2, abs=1e-6)
    with pytest.raises(ValueError, match="scale_reduction"):
        multiscale_consistency_loss([t0], [s0], 0.5, scale_reduction="max")


def test_consistency_gradient_reaches_student_only():
    t = torch.randn(2, 3, 4, 4, requires_grad=True)
    s = torch.randn(2, 3, 4, 4, requires_grad=True)
    multiscale_consistency_loss([t], [s], 0.8).backward()
    assert t.grad is None
    assert s.grad is not None and s.grad.abs().sum() > 0


def test_consistency_regions_uses_sigmoid():
    t = torch.zeros(1, 1, 1)  # sigmoid 0.5, sharpened stays 0.5
    s = torch.full((1, 1, 1), math.log(3.0))  # sigmoid 0.75
    assert multiscale_consistency_loss([t], [s], 0.8, regions=True).item() == pytest.approx(0.0625, abs=1e-6)


def test_objective_eq5():
    assert semi_supervised_objective(torch.tensor(1.5), torch.tensor(0.2), 30.0).item() == pytest.approx(7.5)


def test_multiscale_consistency_aligns_before_sharpening():
    # teacher (0.2, 0.6, 0.2) aligned with ratio (1, 3) -> (0.2, 0.4, 0.4) (ReMixMatch: align, then sharpen), T = 0.5:
    # (0.04, 0.16, 0.16) / 0.36; student (1/3, 1/3, 1/3): mse over the three channels
    t = torch.tensor([0.2, 0.6, 0.2]).log().view(1, 3, 1)
    s = torch.zeros(1, 3, 1)
    target = torch.tensor([0.04, 0.16, 0.16]) / 0.36
    expected = ((target - 1 / 3) ** 2).mean().item()
    got = multiscale_consistency_loss([t], [s], temperature=0.5, alignment=torch.tensor([1.0, 3.0]))
    assert got.item() == pytest.approx(expected, abs=1e-6)
    assert multiscale_consistency_loss([t], [s], 0.5).item() != pytest.approx(expected, abs=1e-3)
    with pytest.raises(ValueError, match="softmax outputs"):
        multiscale_consistency_loss([t], [s], 0.5, regions=True, alignment=torch.tensor([1.0, 3.0]))
