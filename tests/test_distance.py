"""Signed distance maps (UG-MCL eq. 1) against shapes whose distances are known exactly."""

import numpy as np
import pytest
import torch

from nnunet_ssl.training.distance import SignedDistanceTransform, normalized_signed_distances, signed_distance


def test_sphere_matches_the_analytic_distance():
    # a ball of radius R: the Euclidean distance to its surface is |x - c| - R; voxel centres sit on a grid, so the
    # discrete distance (to the nearest voxel centre of the other side) is within one voxel of it
    n, c, radius = 33, 16.0, 9.3
    r = np.sqrt(((np.indices((n, n, n)) - c) ** 2).sum(0))
    ball = r <= radius
    sdf = signed_distance(ball)
    assert np.abs(sdf - (r - radius)).max() <= 1.0
    assert np.abs(sdf - (r - radius)).mean() < 0.35
    assert (sdf[ball] <= 0).all() and (sdf[~ball] > 0).all()
    # zero exactly on the boundary: object voxels with a face neighbour outside
    face_neighbour_outside = np.zeros_like(ball)
    for axis in range(3):
        for shift in (1, -1):
            face_neighbour_outside |= ~np.roll(ball, shift, axis)
    assert np.array_equal(sdf == 0, ball & face_neighbour_outside)
    # the centre: the nearest outside voxel is the nearest grid offset with |d|^2 > 9.3^2 = 86.49; 87 is no sum
    # of three squares (Legendre: 8b + 7), 88 = 6^2 + 6^2 + 4^2 is
    assert sdf[16, 16, 16] == pytest.approx(-np.sqrt(88))


def test_half_space_with_anisotropic_spacing_is_exact():
    # object: x < 10 along the first axis, spacing 2 mm there: distances are multiples of 2 mm
    shape, spacing = (20, 5, 6), (2.0, 1.0, 0.5)
    mask = np.zeros(shape, bool)
    mask[:10] = True
    sdf = signed_distance(mask, spacing=spacing)
    x = np.arange(20)
    expected = np.where(x < 9, -(10 - x) * 2.0, np.where(x == 9, 0.0, (x - 9) * 2.0))
    assert np.allclose(sdf, expected[:, None, None])

    norm = normalized_signed_distances([mask], spacing=spacing)[0]
    # outside: (x - 9) * 2 / 20 (max at x = 19); inside: -(10 - x) * 2 / 20 (deepest x = 0), boundary 0
    expected_norm = np.where(x < 9, -(10 - x) / 10, np.where(x == 9, 0.0, (x - 9) / 10))
    assert np.allclose(norm, expected_norm[:, None, None])
    assert norm.dtype == np.float32 and norm.min() == -1 and norm.max() == 1


def test_empty_and_full_channels():
    mask = np.zeros((6, 7), bool)
    out = normalized_signed_distances([mask, ~mask])
    assert np.all(out[0] == 1.0) and np.all(out[1] == -1.0)
    with pytest.raises(ValueError, match="object voxel"):
        signed_distance(mask)


def test_ignored_voxels_are_on_neither_side():
    # object x < 10, ignored slab 10 <= x < 14 right next to it, annotated background from x = 14
    x = np.arange(24)
    mask = np.broadcast_to((x < 10)[:, None], (24, 3)).copy()
    known = np.broadcast_to(~((x >= 10) & (x < 14))[:, None], (24, 3)).copy()
    sdf = signed_distance(mask, known)
    # no boundary where the annotation stops: the object voxel at x = 9 is 5 voxels from annotated background
    assert sdf[9, 0] == pytest.approx(-5.0)
    assert sdf[0, 0] == pytest.approx(-14.0)
    assert sdf[14, 0] == pytest.approx(5.0) and sdf[23, 0] == pytest.approx(14.0)
    # an ignored object voxel counts for nothing: the mask is restricted to annotated voxels
    norm = normalized_signed_distances([mask | ~known], known)[0]
    assert norm[9, 0] == pytest.approx(-5 / 14) and norm[23, 0] == pytest.approx(1.0)
    # every voxel ignored except object voxels: a full channel
    assert np.all(normalized_signed_distances([mask], mask)[0] == -1.0)


def test_transform_one_vs_rest_classes_with_deep_supervision_targets():
    # slabs along the first axis: label 0 for x < 4, 1 for 4 <= x < 10, 2 for x >= 10 (24 voxels)
    x = np.arange(24)
    labels = np.select([x < 4, x < 10], [0, 1], 2).astype(np.int16)
    seg = torch.from_numpy(np.broadcast_to(labels[:, None, None], (24, 4, 4)).copy())[None]
    low = seg[:, ::2, ::2, ::2]
    out = SignedDistanceTransform(labels=[0, 1, 2])(segmentation=[seg, low])["segmentation"]
    assert len(out) == 3 and out[0] is seg and out[1] is low
    sdf = out[2]
    assert sdf.dtype == torch.float32 and sdf.shape == (3, 24, 4, 4)
    line = sdf[:, :, 0, 0].numpy()
    # class 0: inside x = 0..3 (boundary at 3, deepest x = 0: 4 voxels to x = 4), outside up to 20 voxels
    assert np.allclose(line[0], np.where(x < 3, -(4 - x) / 4, np.where(x == 3, 0, (x - 3) / 20)))
    # class 1: inside 4..9, nearest outside voxel at 3 or 10; boundary at 4 and 9
    inside1 = np.minimum(x - 3, 10 - x)
    out1 = np.where(x < 4, 4 - x, x - 9)
    expected1 = np.where((x > 4) & (x < 9), -inside1 / 3, np.where((x == 4) | (x == 9), 0, out1 / 14))
    assert np.allclose(line[1], expected1)
    # class 2: inside 10..23 (boundary 10), outside 0..9
    assert np.allclose(line[2], np.where(x > 10, -(x - 9) / 14, np.where(x == 10, 0, (10 - x) / 10)))
    # a single target (deep supervision off) becomes [target, sdf]
    single = SignedDistanceTransform(labels=[0, 1, 2])(segmentation=seg)["segmentation"]
    assert len(single) == 2 and torch.equal(single[1], sdf)


def test_transform_regions_with_ignore_channel():
    # regions as nnU-Net's ConvertSegmentationToRegionsTransform writes them: region channels + ignore channel last
    x = np.arange(16)
    organ = x < 8
    lesion = x < 3
    ignore = (x >= 8) & (x < 10)
    seg = torch.from_numpy(np.stack([organ, lesion, ignore])[:, :, None].repeat(2, 2))
    sdf = SignedDistanceTransform(labels=None, ignore_label=3)(segmentation=seg)["segmentation"][-1]
    assert sdf.shape == (2, 16, 2)
    organ_line = sdf[0, :, 0].numpy()
    # organ: no annotated outside voxel before x = 10, so x = 7 is 3 voxels deep, not a boundary
    assert organ_line[7] == pytest.approx(-3 / 10) and organ_line[0] == pytest.approx(-1.0)
    assert organ_line[10] == pytest.approx(3 / 8) and organ_line[15] == pytest.approx(1.0)
    lesion_line = sdf[1, :, 0].numpy()
    assert lesion_line[2] == 0 and lesion_line[0] == pytest.approx(-1.0) and lesion_line[15] == pytest.approx(1.0)


def test_softmax_classes_share_transforms_without_changing_the_result():
    # classes partition the annotated voxels, so inside distances come from the other classes' outside distances;
    # the result must equal one-mask-at-a-time computation, with and without an ignored region
    rng = np.random.default_rng(0)
    from scipy.ndimage import gaussian_filter

    field = gaussian_filter(rng.standard_normal((20, 18, 16)), 2.5)
    labels = np.digitize(field, np.quantile(field, [0.5, 0.8]))
    known = np.ones(labels.shape, bool)
    known[:, :, :4] = False
    for k in (None, known):
        shared = normalized_signed_distances([labels == c for c in range(3)], k, spacing=(1.5, 1.0, 1.0))
        alone = np.stack([normalized_signed_distances([labels == c], k, spacing=(1.5, 1.0, 1.0))[0]
                          for c in range(3)])
        valid = np.ones(labels.shape, bool) if k is None else k
        assert np.array_equal(shared[:, valid], alone[:, valid])
