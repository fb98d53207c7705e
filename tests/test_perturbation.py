"""The stochastic perturbation module (MuST section 2.2)."""

import pytest
import torch

from nnunet_ssl.methods.must.perturbation import PERTURBATIONS, PerturbationConfig, perturb, perturbation_masks

perturb_ = perturb

CFG = PerturbationConfig()


@pytest.mark.parametrize("by_tensor", [False, True], ids=["eager", "compile-friendly"])
def test_each_perturbation_behaves_as_documented(by_tensor):
    torch.manual_seed(0)
    x = torch.rand(2, 8, 6, 6, 6) + 0.5

    def perturb(x, cfg, choice):
        return perturb_(x, cfg, choice, select_by_tensor=by_tensor)

    uni = perturb(x, CFG, 0) / x
    assert uni.min() >= 1 - CFG.uniform_range - 1e-6 and uni.max() <= 1 + CFG.uniform_range + 1e-6
    assert uni.std() > 0.1  # per element, not constant
    gauss = perturb(x, CFG, 1) / x - 1
    assert abs(gauss.std().item() - CFG.gaussian_std) < 0.02 and abs(gauss.mean().item()) < 0.02
    # feature dropout: zero where the channel mean exceeds gamma * peak (gamma in [0.7, 0.9]), untouched elsewhere
    fd = perturb(x, CFG, 2)
    attention = x.mean(1)
    peak = attention.flatten(1).amax(1).view(2, 1, 1, 1)
    dropped = (fd == 0).all(1)
    assert (attention[dropped] >= 0.7 * peak.expand_as(attention)[dropped]).all()
    assert (attention[~dropped] < 0.9 * peak.expand_as(attention)[~dropped]).all()
    assert torch.equal(fd.permute(0, 2, 3, 4, 1)[~dropped], x.permute(0, 2, 3, 4, 1)[~dropped])
    assert dropped.any()  # the peak location is always dropped
    # spatial dropout: whole channels zeroed, kept ones scaled by 1 / (1 - p)
    sd = perturb(x, CFG, 3) / x
    per_channel = sd.flatten(2)
    assert torch.allclose(per_channel, per_channel[..., :1].expand_as(per_channel))
    values = set(torch.round(per_channel[..., 0] * 1e4).flatten().tolist())
    assert values <= {0.0, round(1e4 / (1 - CFG.spatial_dropout_p))}


def test_masks_shapes_2d_and_3d():
    for shape in ((2, 4, 8, 8), (2, 4, 4, 8, 8)):
        x = torch.randn(shape)
        masks = perturbation_masks(x, CFG)
        assert len(masks) == len(PERTURBATIONS)
        for m in masks:
            assert torch.broadcast_shapes(m.shape, x.shape) == x.shape
        assert perturb(x, CFG).shape == x.shape


@pytest.mark.parametrize("by_tensor", [False, True], ids=["eager", "compile-friendly"])
def test_draw_is_uniform_over_the_four(by_tensor):
    torch.manual_seed(1)
    x = torch.rand(1, 4, 4, 4) + 1.0
    counts = [0, 0, 0, 0]
    for _ in range(800):
        y = perturb(x, CFG, select_by_tensor=by_tensor) / x
        if (y == 0).all(1).any() and not (y == 0).all():
            counts[2] += 1  # feature dropout: some locations in every channel
        elif torch.allclose(y, y.flatten(2)[..., :1, None].expand_as(y)):
            counts[3] += 1  # spatial dropout: constant per channel
        elif ((y - 1).abs() <= CFG.uniform_range + 1e-6).all() and (y - 1).abs().max() > 0:
            counts[0] += 1  # uniform (Gaussian with std 0.2 over 64 elements almost surely exceeds 0.3 somewhere)
        else:
            counts[1] += 1
    assert all(150 < c < 250 for c in counts), counts


def test_gradient_flows_through_perturbation():
    x = torch.randn(2, 4, 8, 8, requires_grad=True)
    perturb(x, CFG, 0).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
