"""Surface distances in millimetres: 95th-percentile Hausdorff distance (HD95) and average symmetric surface
distance (ASD), with SimpleITK's distance transform.

Definitions (for a prediction mask P and a reference mask R on the same voxel grid with voxel size ``spacing``):

- the *surface* of a mask is its voxels with a 6-neighbour outside the mask (``sitk.BinaryContour``, not fully
  connected; voxels on the image border count as surface, as if the image were padded with background);
- d(p, S) is the Euclidean distance in mm from the centre of voxel p to the nearest voxel centre of surface S
  (``sitk.SignedMaurerDistanceMap`` of S with the image spacing);
- HD95 = max(95th percentile of d(p, S_R) over p in S_P, 95th percentile of d(r, S_P) over r in S_R), the
  symmetric robust Hausdorff distance (as in MONAI and DeepMind's surface-distance);
- ASD = (sum of d(p, S_R) over S_P + sum of d(r, S_P) over S_R) / (|S_P| + |S_R|), the pooled mean of both
  directions (Heimann et al. 2009).

Empty masks, stated once for every report built on these functions:

- both empty: both distances are NaN (nothing to measure, like nnU-Net's Dice, which is NaN when a class is absent
  from reference and prediction); means skip NaN (``np.nanmean``) as nnU-Net's summary does;
- exactly one empty (a missed or a hallucinated structure): both distances are the length of the image's diagonal
  in mm, the largest distance possible within the image, so that the failure counts against the method instead
  of vanishing from the mean.
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk


def _image(mask: np.ndarray, spacing) -> sitk.Image:
    img = sitk.GetImageFromArray(mask.astype(np.uint8))
    img.SetSpacing([float(s) for s in reversed(spacing)])  # numpy axis order -> ITK's reversed order
    return img


def surface_mask(mask: np.ndarray, spacing) -> np.ndarray:
    """Voxels of ``mask`` with a 6-neighbour (4 in 2D) outside it or outside the image."""
    padded = np.pad(mask.astype(bool), 1)
    contour = sitk.BinaryContour(_image(padded, (1,) * mask.ndim), fullyConnected=False, backgroundValue=0,
                                 foregroundValue=1)
    inner = tuple(slice(1, -1) for _ in range(mask.ndim))
    return sitk.GetArrayViewFromImage(contour)[inner].astype(bool)


def distance_to_surface(surface: np.ndarray, spacing) -> np.ndarray:
    """Distance in mm from every voxel centre to the nearest voxel centre of ``surface``."""
    dist = sitk.SignedMaurerDistanceMap(_image(surface, spacing), insideIsPositive=False, squaredDistance=False,
                                        useImageSpacing=True)
    # outside the surface the signed map is the exact distance to the nearest surface voxel centre; inside (a
    # surface voxel, or one enclosed by surface voxels where the surface is thicker than a voxel) it is <= 0
    return np.clip(sitk.GetArrayFromImage(dist), 0, None)


def directed_surface_distances(pred: np.ndarray, ref: np.ndarray, spacing) -> tuple[np.ndarray, np.ndarray]:
    """Distances (mm) from each surface voxel of ``pred`` to the surface of ``ref`` and vice versa. Both masks
    must be non-empty."""
    sp, sr = surface_mask(pred, spacing), surface_mask(ref, spacing)
    return distance_to_surface(sr, spacing)[sp], distance_to_surface(sp, spacing)[sr]


def surface_metrics(pred: np.ndarray, ref: np.ndarray, spacing, percentile: float = 95.0) -> dict[str, float]:
    """``{'HD95': ..., 'ASD': ...}`` in mm for two boolean masks of the same shape (2D or 3D); ``spacing`` in the
    arrays' axis order. See the module docstring for the definitions and for empty masks."""
    pred, ref = np.asarray(pred, bool), np.asarray(ref, bool)
    if pred.shape != ref.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from reference shape {ref.shape}")
    if len(spacing) != pred.ndim:
        raise ValueError(f"spacing {tuple(spacing)} does not match {pred.ndim} image axes")
    has_p, has_r = pred.any(), ref.any()
    if not has_p and not has_r:
        return {"HD95": float("nan"), "ASD": float("nan")}
    if not (has_p and has_r):
        worst = float(np.sqrt(np.sum((np.asarray(pred.shape) * np.asarray(spacing, float)) ** 2)))
        return {"HD95": worst, "ASD": worst}
    d_pr, d_rp = directed_surface_distances(pred, ref, spacing)
    hd = max(np.percentile(d_pr, percentile), np.percentile(d_rp, percentile))
    asd = (d_pr.sum() + d_rp.sum()) / (d_pr.size + d_rp.size)
    return {"HD95": float(hd), "ASD": float(asd)}
