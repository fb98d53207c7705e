"""POPCORN equations 2-5 against values computed by hand (and with numpy on one-hot maps)."""

import math

import numpy as np
import pytest
import torch

from nnunet_ssl.methods.popcorn.losses import (
    bottleneck_consistency_loss,
    label_similarity,
    latent_distance,
    pair_similarity,
    popcorn_objective,
)


def test_latent_distance_eq4_by_hand():
    # h_i = (1, 2), h_j = (3, 0): ||h_i - h_j||^2 = 4 + 4 = 8, ||h_i||^2 = 5, ||h_j||^2 = 9 -> 2 * 8 / 14 = 8 / 7
    h_i = torch.tensor([[[1.0], [2.0]]])  # (P=1, C=2, 1 position)
    h_j = torch.tensor([[[3.0], [0.0]]])
    assert latent_distance(h_i, h_j).item() == pytest.approx(8 / 7)
    # identical maps: 0; opposite maps: 2 * ||2h||^2 / (2 ||h||^2) = 4 (the maximum)
    h = torch.randn(3, 4, 2, 2, 2)
    assert torch.allclose(latent_distance(h, h), torch.zeros(3))
    assert torch.allclose(latent_distance(h, -h), torch.full((3,), 4.0))
    # scale invariant: the denominator normalises by the maps' energy
    assert torch.allclose(latent_distance(h, h.flip(0)), latent_distance(5 * h, 5 * h.flip(0)), atol=1e-6)
    assert latent_distance(torch.zeros(1, 2, 2), torch.zeros(1, 2, 2)).item() == 0.0


def test_label_similarity_eq3_by_hand():
    # 2 classes, 2 voxels; y_i = [c0, c1], y_j = [c0, c0]: one-hot squared differences (0,0) and (1,1)
    # -> mse = 2 / 4 = 0.5 -> exp(-0.5)
    y_i = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])  # (P=1, C=2, voxels=2)
    y_j = torch.tensor([[[1.0, 1.0], [0.0, 0.0]]])
    assert label_similarity(y_i, y_j).item() == pytest.approx(math.exp(-0.5))
    # the second voxel not annotated in one of them: only the first counts -> mse 0 -> 1
    annotated = torch.tensor([[[True, False]]])
    assert label_similarity(y_i, y_j, annotated).item() == pytest.approx(1.0)
    # nothing annotated in both: similarity 0
    assert label_similarity(y_i, y_j, torch.zeros_like(annotated)).item() == 0.0


def _numpy_similarity(a: np.ndarray, b: np.ndarray, num_classes: int, ignore: int | None) -> float:
    """exp(-mse) of one-hot maps over the voxels annotated in both (independent of the torch code)."""
    valid = np.ones(a.shape, bool) if ignore is None else (a != ignore) & (b != ignore)
    if not valid.any():
        return 0.0
    oa = np.eye(num_classes)[np.where(valid, a, 0)][valid]
    ob = np.eye(num_classes)[np.where(valid, b, 0)][valid]
    return float(np.exp(-((oa - ob) ** 2).mean()))


def test_pair_similarity_labels_matches_one_hot_mse():
    rng = np.random.default_rng(0)
    target = rng.integers(0, 3, size=(5, 1, 4, 4, 3))  # odd batch: the last patch is unpaired
    sim = pair_similarity(torch.from_numpy(target).float(), 3, regions=False, ignore_label=None)
    assert sim.shape == (2,)
    for k in range(2):
        assert sim[k].item() == pytest.approx(_numpy_similarity(target[2 * k, 0], target[2 * k + 1, 0], 3, None))
    # with an ignore label (value 3): voxels ignored in either patch are excluded
    target = rng.integers(0, 4, size=(4, 1, 5, 5))
    sim = pair_similarity(torch.from_numpy(target), 3, regions=False, ignore_label=3)
    for k in range(2):
        assert sim[k].item() == pytest.approx(_numpy_similarity(target[2 * k, 0], target[2 * k + 1, 0], 3, 3))
    # a small hand case: 4 voxels, 3 classes; labels (0, 1, 2, ign) vs (0, 2, 2, 1): the last voxel is ignored,
    # one of the three others differs -> mse = 2 / (3 * 3) -> exp(-2/9)
    t = torch.tensor([[[0, 1, 2, 3]], [[0, 2, 2, 1]]])
    assert pair_similarity(t, 3, False, 3).item() == pytest.approx(math.exp(-2 / 9))


def test_pair_similarity_regions_with_ignore_channel():
    # two regions + nnU-Net's ignore channel last; 2 voxels: the second is ignored in patch j
    a = torch.tensor([[[1, 1], [0, 1], [0, 0]]])  # (1, R+1, 2)
    b = torch.tensor([[[1, 0], [1, 0], [0, 1]]])
    # counted voxel 0: region channels (1,0) vs (1,1): squared diffs 0 and 1 -> mse = 1 / 2
    sim = pair_similarity(torch.cat((a, b)), 3, regions=True, ignore_label=3)
    assert sim.item() == pytest.approx(math.exp(-0.5))
    # without an ignore label every channel is a region: diffs (0,1 | 1,1 | 0,1) -> 4 / 6
    assert pair_similarity(torch.cat((a, b)), 3, regions=True, ignore_label=None).item() == \
        pytest.approx(math.exp(-4 / 6))


def test_bottleneck_consistency_eq2_pairs_and_gradients():
    h = torch.tensor([[[1.0], [2.0]], [[3.0], [0.0]], [[1.0], [1.0]], [[1.0], [1.0]], [[9.0], [9.0]]],
                     requires_grad=True)  # 5 patches: pairs (0, 1), (2, 3); patch 4 unpaired
    sim = torch.tensor([0.5, 1.0], requires_grad=True)
    loss = bottleneck_consistency_loss(h, sim)
    # pair 0: distance 8/7, similarity 0.5; pair 1: identical maps -> 0; mean over the 2 pairs
    assert loss.item() == pytest.approx((8 / 7 * 0.5 + 0.0) / 2)
    loss.backward()
    assert h.grad[0].abs().sum() > 0 and h.grad[1].abs().sum() > 0  # both patches of a pair are pulled
    assert h.grad[4].abs().sum() == 0  # the unpaired patch is not in L_reg
    assert sim.grad is None  # the similarity is a weight
    with pytest.raises(ValueError, match="pair"):
        bottleneck_consistency_loss(h[:1], sim[:0])


def test_objective_eq5_for_a_pair():
    # eq. 5 for one pair: L_seg(i) + L_seg(j) + alpha L_reg = 0.8 + 0.6 + 0.2 * 0.5 = 1.5; nnU-Net's batch loss
    # is (0.8 + 0.6) / 2 = 0.7, and the objective is eq. 5 / 2 = 0.75
    assert popcorn_objective(torch.tensor(0.7), torch.tensor(0.5), 0.2).item() == pytest.approx(1.5 / 2)


def test_training_pass_compiles_to_one_graph():
    """The network's training forward (outputs and h(X)) and eq. 2-5 trace without graph breaks, as under
    nnU-Net's torch.compile on CUDA (traced here with the aot_eager backend on the CPU)."""
    from dynamic_network_architectures.architectures.unet import PlainConvUNet

    from nnunet_ssl.methods.popcorn.network import POPCORNNetwork

    net = POPCORNNetwork(PlainConvUNet(1, 3, (8, 16, 32), torch.nn.Conv3d, 3, (1, 2, 2), 2, 3, (2, 2), True,
                                       torch.nn.InstanceNorm3d, {"affine": True}, None, None, torch.nn.LeakyReLU,
                                       {"inplace": True}, deep_supervision=True))

    def step(x, target):
        out, h = net(x, return_bottleneck=True)
        reg = bottleneck_consistency_loss(h, pair_similarity(target, 3, False, 3))
        return popcorn_objective(out[0].mean(), reg, 0.2)

    x = torch.randn(4, 1, 16, 16, 16)
    target = torch.randint(0, 4, (4, 1, 16, 16, 16))
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    assert torch.allclose(compiled(x, target), step(x, target), atol=1e-5)
