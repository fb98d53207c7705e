"""Local contrastive loss (paper 004, eq. 2-4) against values computed by hand and by an independent numpy loop."""

import math

import numpy as np
import pytest
import torch

from nnunet_ssl.methods.local_contrastive.losses import (
    class_means,
    local_contrastive_loss,
    local_contrastive_objective,
    sample_anchors,
)

TAU = 0.1
A = math.sqrt(2) / TAU  # cos = 1/sqrt(2), divided by tau


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))  # ln(1 + e^x)


def image_a():
    """Class 1: (1, 1), (1, -1) -> mean (1, 0); class 2: (0, 1), (0, 3) -> mean (0, 2). Embeddings (D=2, 4 pixels)."""
    z = torch.tensor([[1.0, 1.0], [1.0, -1.0], [0.0, 1.0], [0.0, 3.0]]).T
    member = torch.tensor([[1, 1, 0, 0], [0, 0, 1, 1]], dtype=torch.bool)
    return z, member


def image_b():
    """Class 1: (0, 1) twice -> mean (0, 1); class 2: (1, 0) twice -> mean (1, 0)."""
    z = torch.tensor([[0.0, 1.0], [0.0, 1.0], [1.0, 0.0], [1.0, 0.0]]).T
    member = torch.tensor([[1, 1, 0, 0], [0, 0, 1, 1]], dtype=torch.bool)
    return z, member


def all_pixels(member: torch.Tensor, s: int = 2):
    """With exactly s pixels per class, sampling s without replacement draws all of them."""
    return sample_anchors(member, s, torch.Generator().manual_seed(0))


# hand values (tau = 0.1): -log eq. 4 = ln(1 + sum_k e^{(sim_k - sim_c) / tau})
# image a with its own means (1, 0), (0, 2):
#   (1, 1): cos 1/sqrt2 to both means -> ln 2;  (1, -1): cos 1/sqrt2 to its own, -1/sqrt2 to the other mean,
#   (sim_k - sim_c) / tau = -sqrt2 / tau = -A -> ln(1 + e^{-A});  (0, 1), (0, 3): cos 1 vs 0 -> ln(1 + e^{-10});
#   eq. 3: mean over the two pixels of each class, then over the two classes
L_AA = 0.25 * (math.log(2) + softplus(-A)) + 0.5 * softplus(-1 / TAU)
L_BB = softplus(-1 / TAU)  # every pixel of b is on its own class mean and orthogonal to the other
# image a's pixels against image b's means (0, 1), (1, 0):
#   (1, 1): ln 2;  (1, -1) of class 1: cos -1/sqrt2 to (0, 1), 1/sqrt2 to (1, 0) -> ln(1 + e^{A});
#   (0, 1), (0, 3) of class 2: cos 0 to (1, 0), 1 to (0, 1) -> ln(1 + e^{10})
L_AB = 0.5 * (0.5 * (math.log(2) + softplus(A)) + softplus(1 / TAU))
# image b's pixels against image a's means (1, 0), (0, 2): each is orthogonal to its own class mean, on the other
L_BA = softplus(1 / TAU)


def test_intra_image_by_hand():
    z, member = image_a()
    idx, valid = all_pixels(member[None])
    assert valid.all()
    loss = local_contrastive_loss(z[None], member[None], idx, valid, TAU, "intra")
    assert loss.item() == pytest.approx(L_AA, rel=1e-5)


def test_inter_image_by_hand():
    (za, ma), (zb, mb) = image_a(), image_b()
    z, member = torch.stack((za, zb)), torch.stack((ma, mb))
    idx, valid = all_pixels(member)
    intra = local_contrastive_loss(z, member, idx, valid, TAU, "intra")
    assert intra.item() == pytest.approx((L_AA + L_BB) / 2, rel=1e-5)
    # inter: pairs (x, x') over the whole batch, x' = x included; mean over the four pairs (eq. 2)
    inter = local_contrastive_loss(z, member, idx, valid, TAU, "inter")
    assert inter.item() == pytest.approx((L_AA + L_BB + L_AB + L_BA) / 4, rel=1e-5)


def test_absent_class_is_finite_and_left_out():
    za, ma = image_a()
    z = torch.stack((za, za))
    member = torch.stack((ma, torch.stack((ma[0], torch.zeros_like(ma[1])))))  # class 2 absent in image 2
    idx, valid = sample_anchors(member, 2, torch.Generator().manual_seed(0))
    assert valid[1, 1].sum() == 0 and valid[0].all()
    z.requires_grad_(True)
    intra = local_contrastive_loss(z, member, idx, valid, TAU, "intra")
    # image 2: class 2 has no pixel and no mean, so class 1 has no negative: eq. 4 = 1, loss 0; image 1 as by hand
    assert intra.item() == pytest.approx(L_AA / 2, rel=1e-5)
    intra.backward()
    assert torch.isfinite(z.grad).all()
    # inter: pair (1, 1) -> L_AA; pair (1, 2): class 2 has no mean in x' (left out), class 1 no negative -> 0;
    # pair (2, 1): image 2's class-1 pixels against image 1's means, as for image 1 -> (ln 2 + ln(1 + e^-A)) / 2;
    # pair (2, 2) -> 0
    inter = local_contrastive_loss(z.detach(), member, idx, valid, TAU, "inter")
    assert inter.item() == pytest.approx((L_AA + 0.5 * (math.log(2) + softplus(-A))) / 4, rel=1e-5)
    # no class anywhere: zero, finite, and still differentiable (the trainer adds it to the segmentation loss)
    empty = torch.zeros_like(member)
    idx, valid = sample_anchors(empty, 3)
    zz = torch.randn(2, 2, 4, requires_grad=True)
    loss = local_contrastive_loss(zz, empty, idx, valid, TAU, "inter")
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(zz.grad).all()


def reference(z, member, idx, valid, tau, matching):
    """Eq. 2-4 with explicit loops in numpy (float64)."""
    z, member, idx, valid = (t.detach().double().numpy() if t.is_floating_point() else t.numpy()
                             for t in (z, member, idx, valid))
    b, d = z.shape[:2]
    z = z.reshape(b, d, -1)
    member = member.reshape(b, member.shape[1], -1)
    k = member.shape[1]
    means = np.zeros((b, k, d))
    present = member.any(-1)
    for i in range(b):
        for c in range(k):
            if present[i, c]:
                means[i, c] = z[i][:, member[i, c]].mean(1)

    def cos(u, v):
        return u @ v / (np.linalg.norm(u) * np.linalg.norm(v))

    pair_values = []
    for i in range(b):
        for j in ([i] if matching == "intra" else range(b)):
            class_values = []
            for c in range(k):
                if not present[j, c]:
                    continue
                values = []
                for s in range(idx.shape[-1]):
                    if not valid[i, c, s]:
                        continue
                    n = idx[i, c, s]
                    pixel = z[i][:, n]
                    pos = math.exp(cos(pixel, means[j, c]) / tau)
                    neg = sum(math.exp(cos(pixel, means[j, q]) / tau) for q in range(k)
                              if q != c and present[j, q] and not member[i, q, n])
                    values.append(-math.log(pos / (pos + neg)))
                if values:
                    class_values.append(np.mean(values))
            if class_values:
                pair_values.append(np.mean(class_values))
    return float(np.mean(pair_values)) if pair_values else 0.0


@pytest.mark.parametrize("matching", ["intra", "inter"])
@pytest.mark.parametrize("overlapping", [False, True])
def test_random_batch_against_numpy_loops(matching, overlapping):
    g = torch.Generator().manual_seed(1)
    z = torch.randn(3, 5, 6, 7, generator=g)  # 3 images, D = 5, 6x7 pixels
    labels = torch.randint(-1, 4, (3, 6, 7), generator=g)  # -1: ignore / outside, 0..3 classes
    labels[2][labels[2] == 3] = 0  # class 3 absent from image 3
    if overlapping:  # regions: {1, 2, 3}, {2, 3}, {3}
        member = torch.stack([labels >= 1, labels >= 2, labels == 3], 1)
    else:
        member = torch.stack([labels == c for c in range(4)], 1)
    idx, valid = sample_anchors(member, 3, g)
    got = local_contrastive_loss(z, member, idx, valid, 0.5, matching)
    assert got.item() == pytest.approx(reference(z, member, idx, valid, 0.5, matching), rel=1e-5)


def test_class_means_over_all_pixels_of_the_class():
    z = torch.arange(12.0).view(1, 3, 4)  # D = 3, 4 pixels
    member = torch.tensor([[[1, 0, 1, 0], [0, 0, 0, 0]]], dtype=torch.bool)
    means, present = class_means(z, member)
    assert torch.allclose(means[0, 0], torch.tensor([1.0, 5.0, 9.0]))  # mean of pixels 0 and 2
    assert present.tolist() == [[True, False]] and means[0, 1].abs().sum() == 0


def test_sampling_draws_only_pixels_of_the_class():
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(-1, 3, (4, 4, 4, 4), generator=g)  # -1: voxels of no class (ignore, outside the mask)
    labels[3][labels[3] == 2] = 0  # class 2 absent from image 4
    labels[2] = 0
    labels[2, 0, 0, :2] = 1  # class 1 has only 2 voxels in image 3
    member = torch.stack([labels == c for c in range(3)], 1)
    seen = torch.zeros_like(member.flatten(2))
    for _ in range(200):
        idx, valid = sample_anchors(member, 3, g)
        assert idx.shape == valid.shape == (4, 3, 3)
        for i in range(4):
            for c in range(3):
                drawn = idx[i, c][valid[i, c]]
                count = int(member[i, c].sum())
                assert len(drawn) == min(3, count)  # without replacement, all of them if fewer
                assert len(set(drawn.tolist())) == len(drawn)
                assert member[i, c].flatten()[drawn].all()  # only pixels of that class: never -1 (no class)
                seen[i, c, drawn] = True
    assert torch.equal(seen[0], member[0].flatten(1))  # every pixel of a class gets drawn over many iterations
    assert valid.sum() > 0


def test_objective_eq2():
    assert local_contrastive_objective(torch.tensor(2.0), torch.tensor(3.0), 0.1).item() == pytest.approx(2.3)


def test_loss_gradient_reaches_anchors_and_means():
    z, member = image_a()
    z = z[None].clone().requires_grad_(True)
    idx, valid = all_pixels(member[None])
    local_contrastive_loss(z, member[None], idx, valid, TAU, "intra").backward()
    assert (z.grad.abs().sum(1) > 0).all()  # every pixel: as an anchor and through its class mean
