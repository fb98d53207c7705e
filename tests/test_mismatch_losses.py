"""MisMatch's losses (section 2.3) against values and gradients computed by hand with numpy."""

import numpy as np
import pytest
import torch

from nnunet_ssl.methods.mismatch.losses import (
    consistency_loss,
    mismatch_objective,
    mse_to_detached,
    supervised_loss,
)


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def test_consistency_value_and_stop_gradient_softmax():
    rng = np.random.default_rng(0)
    a_np, b_np = rng.normal(size=(2, 3, 4, 5)), rng.normal(size=(2, 3, 4, 5))
    a = torch.tensor(a_np, requires_grad=True)
    b = torch.tensor(b_np, requires_grad=True)
    loss = consistency_loss(a, b)
    p1, p2 = _softmax(a_np), _softmax(b_np)
    n = p1.size
    assert loss.item() == pytest.approx(((p1 - p2) ** 2).sum() / n, rel=1e-6)
    loss.backward()
    # each decoder gets the gradient of its own term only: d/dp1 [1/2 MSE(p1, sg p2)] = (p1 - p2) / n, then
    # through the softmax Jacobian: dL/da_c = p1_c (g_c - sum_k g_k p1_k). Without the stop-gradient the gradient
    # would be twice this.
    for logits, p, q in ((a, p1, p2), (b, p2, p1)):
        g = (p - q) / n
        expected = p * (g - (g * p).sum(1, keepdims=True))
        np.testing.assert_allclose(logits.grad.numpy(), expected, rtol=1e-5, atol=1e-9)  # fp32 inside


def test_consistency_regions_uses_sigmoid_per_region():
    rng = np.random.default_rng(1)
    a_np, b_np = rng.normal(size=(1, 2, 6)), rng.normal(size=(1, 2, 6))
    a = torch.tensor(a_np, requires_grad=True)
    b = torch.tensor(b_np, requires_grad=True)
    loss = consistency_loss(a, b, regions=True)
    s1, s2 = 1 / (1 + np.exp(-a_np)), 1 / (1 + np.exp(-b_np))
    assert loss.item() == pytest.approx(((s1 - s2) ** 2).mean(), rel=1e-6)
    loss.backward()
    np.testing.assert_allclose(a.grad.numpy(), (s1 - s2) / s1.size * s1 * (1 - s1), rtol=1e-5, atol=1e-9)  # fp32 inside


def test_no_gradient_reaches_the_target_side():
    prediction = torch.rand(2, 3, 4, requires_grad=True)
    target = torch.rand(2, 3, 4, requires_grad=True)
    mse_to_detached(prediction, target).backward()
    assert target.grad is None
    np.testing.assert_allclose(prediction.grad.numpy(),
                               2 * (prediction.detach().numpy() - target.detach().numpy()) / prediction.numel(),
                               rtol=1e-6)


def test_supervised_loss_on_each_decoder_and_objective():
    calls = []

    def loss_fn(outputs, target):
        calls.append(outputs)
        return sum(o.sum() for o in outputs) * target

    out_d = [torch.tensor([1.0, 2.0]), torch.tensor([3.0])]
    out_e = [torch.tensor([10.0]), torch.tensor([20.0])]
    assert supervised_loss(loss_fn, out_d, out_e, 2.0).item() == (6.0 + 30.0) * 2
    assert calls == [out_d, out_e]
    assert mismatch_objective(torch.tensor(1.5), torch.tensor(0.25), 0.5).item() == pytest.approx(1.625)


def test_consistency_with_aligned_targets_by_hand():
    # one voxel per decoder: p_d1 = (0.2, 0.6, 0.2), p_d2 = (0.4, 0.3, 0.3); ratio (1, 3) keeps each background and
    # splits the foreground mass 3:1 towards label 2 relative to p: a(p_d2) = (0.4, 0.15, 0.45),
    # a(p_d1) = (0.2, 0.4, 0.4); L_c = 1/2 [MSE(p_d1, a(p_d2)) + MSE(p_d2, a(p_d1))]
    p1, p2 = np.array([0.2, 0.6, 0.2]), np.array([0.4, 0.3, 0.3])
    a = torch.tensor(np.log(p1), requires_grad=True).view(1, 3, 1)
    b = torch.tensor(np.log(p2), requires_grad=True).view(1, 3, 1)
    a2, a1 = np.array([0.4, 0.15, 0.45]), np.array([0.2, 0.4, 0.4])
    expected = 0.5 * (((p1 - a2) ** 2).mean() + ((p2 - a1) ** 2).mean())
    loss = consistency_loss(a, b, alignment=torch.tensor([1.0, 3.0]))
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert loss.item() != pytest.approx(consistency_loss(a, b).item(), rel=1e-3)
    with pytest.raises(ValueError, match="softmax outputs"):
        consistency_loss(a, b, regions=True, alignment=torch.tensor([1.0, 3.0]))
