"""HD95 and ASD against hand-computed values and an independent brute-force computation."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.ndimage import gaussian_filter

from nnunet_ssl.evaluation.surface import surface_mask, surface_metrics


def test_parallel_plates_anisotropic_spacing():
    # two one-voxel-thick plates 3 slices apart along axis 0: every surface voxel of one lies straight above one
    # of the other, so every surface distance is 3 * spacing[0] = 6 mm whatever the in-plane spacing
    a = np.zeros((16, 20, 20), bool)
    b = np.zeros_like(a)
    a[5, 4:15, 3:12] = True
    b[8, 4:15, 3:12] = True
    out = surface_metrics(a, b, (2.0, 0.5, 0.7))
    assert out["HD95"] == pytest.approx(6.0)
    assert out["ASD"] == pytest.approx(6.0)
    # the same offset along the finest axis
    a2, b2 = np.moveaxis(a, 0, 2), np.moveaxis(b, 0, 2)
    assert surface_metrics(a2, b2, (0.5, 0.7, 2.0))["HD95"] == pytest.approx(6.0)
    assert surface_metrics(a2, b2, (0.5, 2.0, 0.3))["ASD"] == pytest.approx(0.9)


def test_cube_shifted_by_known_distance():
    # a 6^3-voxel cube A and B = A shifted by 2 voxels along axis 1 (1.5 mm there); 216 - 64 = 152 surface voxels
    # each. By hand: A's 36 leading-face voxels (y = 2) have every B voxel at y >= 4, and B's face voxel straight
    # ahead at 2 x 1.5 = 3 mm; every other surface voxel of A is closer to B's surface (A's walls at y >= 4 lie on
    # B's walls, A's y = 3 ring is 1.5 mm from B's face, A's trailing face lies inside B, <= 1.6 mm from a wall).
    # So the largest distance is 3 mm, held by 36/152 > 5% of the voxels: HD95 = 3 mm, in both directions.
    a = np.zeros((12, 16, 12), bool)
    a[3:9, 2:8, 3:9] = True
    b = np.roll(a, 2, axis=1)
    spacing = (1.0, 1.5, 0.8)
    d_ab, d_ba = _brute_force(a, b, spacing), _brute_force(b, a, spacing)
    assert d_ab.size == d_ba.size == 152
    assert np.sum(np.isclose(d_ab, 3.0)) == 36 and np.all(d_ab[~np.isclose(d_ab, 3.0)] < 3.0)
    assert np.max(d_ab) == pytest.approx(3.0) and np.max(d_ba) == pytest.approx(3.0)
    out = surface_metrics(a, b, spacing)
    assert out["HD95"] == pytest.approx(3.0)  # > 5% of the distances are the maximum 3 mm
    assert out["ASD"] == pytest.approx((d_ab.sum() + d_ba.sum()) / 304)


def _surface_points(mask, spacing):
    padded = np.pad(mask, 1)
    inner = padded[1:-1, 1:-1, 1:-1]
    interior = inner.copy()
    for axis in range(3):
        for shift in (1, -1):
            interior &= np.roll(padded, shift, axis=axis)[1:-1, 1:-1, 1:-1]
    return np.argwhere(inner & ~interior) * np.asarray(spacing)


def _brute_force(a, b, spacing):
    pa, pb = _surface_points(a, spacing), _surface_points(b, spacing)
    return np.sqrt(((pa[:, None, :] - pb[None, :, :]) ** 2).sum(-1)).min(1)


@pytest.mark.parametrize("seed", [0, 1])
def test_random_blobs_against_brute_force(seed):
    rng = np.random.default_rng(seed)
    a = gaussian_filter(rng.normal(size=(14, 18, 16)), 2.0) > 0.05
    b = gaussian_filter(rng.normal(size=(14, 18, 16)), 2.0) > 0.05
    spacing = (2.5, 0.9, 1.3)
    d_ab, d_ba = _brute_force(a, b, spacing), _brute_force(b, a, spacing)
    out = surface_metrics(a, b, spacing)
    assert out["HD95"] == pytest.approx(max(np.percentile(d_ab, 95), np.percentile(d_ba, 95)), rel=1e-5)
    assert out["ASD"] == pytest.approx((d_ab.sum() + d_ba.sum()) / (d_ab.size + d_ba.size), rel=1e-5)
    assert surface_mask(a, spacing).sum() == len(_surface_points(a, spacing))


def test_identical_masks_and_border():
    a = np.zeros((10, 10, 10), bool)
    a[:, 2:6, 2:6] = True  # touches the image border on axis 0: those voxels are surface
    assert surface_metrics(a, a, (1.0, 1.0, 1.0)) == {"HD95": 0.0, "ASD": 0.0}
    assert surface_mask(a, (1, 1, 1))[0, 3, 3]


def test_empty_masks():
    a = np.zeros((10, 20, 5), bool)
    b = a.copy()
    b[2:4, 2:4, 2:4] = True
    both = surface_metrics(a, a, (1.0, 1.0, 1.0))
    assert np.isnan(both["HD95"]) and np.isnan(both["ASD"])
    diagonal = np.sqrt((10 * 2.0) ** 2 + (20 * 0.5) ** 2 + (5 * 3.0) ** 2)
    for pred, ref in ((a, b), (b, a)):
        out = surface_metrics(pred, ref, (2.0, 0.5, 3.0))
        assert out["HD95"] == pytest.approx(diagonal) and out["ASD"] == pytest.approx(diagonal)


def test_2d_and_bad_input():
    a = np.zeros((12, 12), bool)
    b = np.zeros_like(a)
    a[2:5, 3:9] = True
    b[6:9, 3:9] = True  # 4 rows further along axis 0
    out = surface_metrics(a, b, (0.5, 1.0))
    assert out["HD95"] == pytest.approx(2.0)  # A's far rows to B's near row: 4 rows x 0.5 mm at most
    with pytest.raises(ValueError, match="shape"):
        surface_metrics(a, b[:5], (1.0, 1.0))
    with pytest.raises(ValueError, match="spacing"):
        surface_metrics(a, b, (1.0, 1.0, 1.0))
