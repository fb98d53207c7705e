"""UG-MCL equations (eq. 2-6) and the mean-teacher consistencies against values computed by hand."""

import math

import pytest
import torch

from nnunet_ssl.methods.ugmcl.losses import (
    cross_task_consistency,
    intra_task_consistency,
    inverse_sdf_transform,
    masked_mean_squared_error,
    mean_teacher_consistency,
    pseudo_label_consistency,
    sdf_regression_loss,
    supervised_objective,
    total_objective,
)
from nnunet_ssl.training.uncertainty import (
    certainty_mask,
    predictive_entropy,
    uncertainty_threshold,
)


def test_inverse_transform_eq5():
    z = torch.tensor([0.0, -0.001, 0.001, -1.0, 1.0])
    out = inverse_sdf_transform(z, 1500.0)
    # 1 / (1 + e^{-1500 * (-z)}): inside (negative) -> 1, outside -> 0, boundary 0.5
    expected = [0.5, 1 / (1 + math.exp(-1.5)), 1 / (1 + math.exp(1.5)), 1.0, 0.0]
    assert out.tolist() == pytest.approx(expected, abs=1e-7)


def test_cross_task_consistency_eq6_by_hand():
    # two channels, two voxels; k = 1000
    probs = torch.tensor([[[0.9, 0.2], [0.1, 0.8]]])  # (B=1, C=2, 2 voxels)
    sdf = torch.tensor([[[-0.002, 0.0], [0.002, -1.0]]])
    inv = [[1 / (1 + math.exp(-2.0)), 0.5], [1 / (1 + math.exp(2.0)), 1.0]]
    expected = sum((p - q) ** 2 for pr, qr in zip([[0.9, 0.2], [0.1, 0.8]], inv) for p, q in zip(pr, qr)) / 4
    assert cross_task_consistency(probs, sdf, 1000.0).item() == pytest.approx(expected, rel=1e-6)


def test_cross_task_gradient_reaches_both_branches():
    probs = torch.rand(1, 2, 3, 3, requires_grad=True)
    sdf = (torch.rand(1, 2, 3, 3) * 0.002 - 0.001).requires_grad_()
    cross_task_consistency(probs, sdf, 1500.0).backward()
    assert probs.grad.abs().sum() > 0 and sdf.grad.abs().sum() > 0


def test_intra_task_consistency_eq4_by_hand():
    # B=1, C=2, 3 voxels; the mask keeps voxels 0 and 2
    seg_s = torch.tensor([[[0.6, 0.5, 0.1], [0.4, 0.5, 0.9]]])
    seg_t = torch.tensor([[[0.8, 0.0, 0.3], [0.2, 1.0, 0.7]]])
    sdf_s = torch.tensor([[[0.1, 0.9, -0.5], [-0.1, 0.3, 0.5]]])
    sdf_t = torch.tensor([[[0.3, -0.9, -0.2], [-0.4, 0.3, 0.1]]])
    mask = torch.tensor([[[1.0, 0.0, 1.0]]])
    # seg: voxel 0: (0.2^2 + 0.2^2)/2 = 0.04, voxel 2: (0.2^2 + 0.2^2)/2 = 0.04 -> sum 0.08 / 2 voxels = 0.04
    # sdf: voxel 0: (0.2^2 + 0.3^2)/2 = 0.065, voxel 2: (0.3^2 + 0.4^2)/2 = 0.125 -> 0.19 / 2 = 0.095
    beta = 0.75
    expected = beta * 0.04 + (1 - beta) * 0.095
    assert intra_task_consistency(seg_s, seg_t, sdf_s, sdf_t, mask, beta).item() == pytest.approx(expected)
    assert intra_task_consistency(seg_s, seg_t, sdf_s, sdf_t, mask, 1.0).item() == pytest.approx(0.04)
    assert intra_task_consistency(seg_s, seg_t, sdf_s, sdf_t, mask, 0.0).item() == pytest.approx(0.095)


def test_masked_mse_empty_mask_and_no_mask():
    s, t = torch.ones(1, 2, 4), torch.zeros(1, 2, 4)
    assert masked_mean_squared_error(s, t, torch.zeros(1, 1, 4)).item() == 0.0
    assert masked_mean_squared_error(s, t).item() == 1.0
    # per-channel masks (regions): each channel normalised by its own kept voxels
    mask = torch.tensor([[[1.0, 0, 0, 0], [1, 1, 1, 1]]])
    assert masked_mean_squared_error(s, t, mask).item() == pytest.approx(5 / 5)


def test_teacher_gets_no_gradient():
    s = torch.rand(1, 2, 4, requires_grad=True)
    t = torch.rand(1, 2, 4, requires_grad=True)
    mean_teacher_consistency(s, t).backward()
    assert t.grad is None and s.grad.abs().sum() > 0


def test_sdf_regression_eq2_ignores_ignored_voxels():
    pred = torch.tensor([[[0.5, -0.5, 0.0, 1.0]]])
    target = torch.tensor([[[0.0, -1.0, 1.0, 1.0]]])
    valid = torch.tensor([[[True, True, False, True]]])
    # (0.25 + 0.25 + 0) / 3 voxels
    assert sdf_regression_loss(pred, target, valid).item() == pytest.approx(0.5 / 3)
    assert sdf_regression_loss(pred, target).item() == pytest.approx(1.5 / 4)
    assert supervised_objective(torch.tensor(1.0), torch.tensor(0.5), 1.0).item() == 1.5


def test_total_objective_eq7():
    out = total_objective(torch.tensor(2.0), torch.tensor(0.5), torch.tensor(0.25), 0.1, 0.2)
    assert out.item() == pytest.approx(2.0 + 0.05 + 0.05)
    assert total_objective(torch.tensor(2.0), None, torch.tensor(1.0), 0.0, 0.5).item() == pytest.approx(2.5)


def test_entropy_eq3():
    # T = 2 passes, one voxel, two classes: softmax of (ln 3, 0) = (0.75, 0.25) and of (0, 0) = (0.5, 0.5);
    # p-hat = (0.625, 0.375)
    p = torch.tensor([[[0.625], [0.375]]])
    u = predictive_entropy(p, regions=False)
    assert u.shape == (1, 1, 1)
    assert u.item() == pytest.approx(-(0.625 * math.log(0.625) + 0.375 * math.log(0.375)))
    # certain and maximally uncertain voxels
    assert predictive_entropy(torch.tensor([[[1.0], [0.0]]]), False).item() == 0.0
    assert predictive_entropy(torch.full((1, 3, 1), 1 / 3), False).item() == pytest.approx(math.log(3))


def test_region_entropy_is_binary_per_channel():
    p = torch.tensor([[[0.5], [0.9]]])  # (B=1, R=2, 1 voxel)
    u = predictive_entropy(p, regions=True)
    assert u.shape == (1, 2, 1)
    assert u[0, 0, 0].item() == pytest.approx(math.log(2))
    assert u[0, 1, 0].item() == pytest.approx(-(0.9 * math.log(0.9) + 0.1 * math.log(0.1)))


def test_threshold_and_mask_by_hand():
    assert uncertainty_threshold(0.0, 2) == pytest.approx(0.75 * math.log(2))
    assert uncertainty_threshold(1.0, 3) == pytest.approx(math.log(3))
    assert uncertainty_threshold(0.5, 2) == pytest.approx(0.875 * math.log(2))
    u = torch.tensor([0.1, 0.5198, 0.52, 0.7])  # 0.75 ln 2 = 0.51986
    assert certainty_mask(u, 0.75 * math.log(2)).tolist() == [1.0, 1.0, 0.0, 0.0]


def test_pseudo_label_consistency_softmax_by_hand():
    # teacher: voxel 0 class 0 at 0.97 (kept), voxel 1 at 0.6 (below 0.95: left out), voxel 2 class 1 at 0.99 (kept)
    teacher = torch.tensor([[[0.97, 0.6, 0.01], [0.03, 0.4, 0.99]]])
    logits = torch.tensor([[[0.0, 5.0, 2.0], [0.0, -5.0, 0.0]]])
    # voxel 0: -log softmax([0, 0])_0 = ln 2; voxel 2: -log softmax([2, 0])_1 = ln(1 + e^2); over all 3 voxels
    expected = (math.log(2) + math.log(1 + math.e ** 2)) / 3
    assert pseudo_label_consistency(logits, teacher, 0.95, regions=False).item() == pytest.approx(expected)
    # UA-MT's certainty mask multiplies in; threshold 0 counts voxel 1 too (-log softmax([5, -5])_0)
    mask = torch.tensor([[[1.0, 1.0, 0.0]]])
    assert pseudo_label_consistency(logits, teacher, 0.95, False, mask).item() == pytest.approx(math.log(2) / 3)
    with_voxel_1 = expected + math.log(1 + math.exp(-10)) / 3
    assert pseudo_label_consistency(logits, teacher, 0.0, False).item() == pytest.approx(with_voxel_1)


def test_pseudo_label_consistency_regions_by_hand():
    # one region channel: p 0.97 -> label 1 (kept), 0.5 -> confidence 0.5 (left out), 0.02 -> label 0 (kept)
    teacher = torch.tensor([[[0.97, 0.5, 0.02]]])
    logits = torch.tensor([[[0.0, 3.0, 1.0]]])
    # BCE(0, 1) = ln 2; BCE(1, 0) = ln(1 + e)
    expected = (math.log(2) + math.log(1 + math.e)) / 3
    assert pseudo_label_consistency(logits, teacher, 0.95, regions=True).item() == pytest.approx(expected)


def test_pseudo_label_consistency_corrects_a_confidently_wrong_student():
    teacher = torch.tensor([[[0.99], [0.01]]], requires_grad=True)  # class 0
    logits = torch.tensor([[[-30.0], [30.0]]], requires_grad=True)  # the student: class 1, certain
    pseudo_label_consistency(logits, teacher, 0.95, False).backward()
    assert teacher.grad is None and logits.grad[0, 0, 0].item() == pytest.approx(-1.0)  # d CE / d logit_0
    squared = torch.tensor([[[-30.0], [30.0]]], requires_grad=True)
    mean_teacher_consistency(torch.softmax(squared, 1), teacher).backward()
    assert squared.grad.abs().max().item() < 1e-20  # the squared error between probabilities has saturated
