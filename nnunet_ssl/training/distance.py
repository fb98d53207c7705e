"""Signed distance maps of label patches, computed in the data-augmentation workers.

A signed distance map (SDF) is negative inside an object, zero on its boundary and positive outside; its
magnitude is the Euclidean distance (in the configuration's voxel spacing) to the other side (eq. 1 of the
UG-MCL paper). As in dual-task consistency work, the map of each channel is normalised per patch: the outside
part is divided by its maximum and the inside part by its maximum, so values lie in [-1, 1] (matching a tanh
output); the boundary (object voxels with a face neighbour outside) is exactly 0.

Channels are one-vs-rest: one map per softmax class (background included, so that channel c of the map
belongs to channel c of the segmentation output) or one per region for region-based datasets.

- Empty channel (no object voxel in the patch): +1 everywhere (everything is far outside).
- Full channel (no known voxel outside the object): -1 everywhere.
- Ignore label: an ignored voxel is on neither side. Distances are measured to the nearest *annotated*
  voxel of the other side, so no boundary is invented where the annotation stops; the SDF loss leaves ignored
  voxels out (their value here is that of the outside formula and carries no meaning).

The distance transform is scipy's exact Euclidean one (``distance_transform_edt``). Per channel one transform
runs on the whole patch (outside distances: to the nearest object voxel). Inside distances (to the nearest
annotated voxel outside the object) need no further transform for softmax classes, which partition the annotated
voxels: the nearest voxel outside class c is the nearest voxel of one of the other classes, the minimum of their
outside distances. For (overlapping) regions a second transform runs on the object's bounding box grown by a
voxel (exact, since every voxel on that grown border is an annotated outside voxel); identical arrays are
transformed once.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from batchgeneratorsv2.transforms.base.basic_transform import SegOnlyTransform
from scipy.ndimage import binary_dilation, distance_transform_edt, generate_binary_structure


class _EDTCache:
    """Euclidean distance transforms of boolean arrays, each distinct array transformed once."""

    def __init__(self, spacing: Sequence[float] | None):
        self.spacing = None if spacing is None else tuple(float(s) for s in spacing)
        self._full: dict[bytes, np.ndarray] = {}

    def full(self, arr: np.ndarray) -> np.ndarray:
        key = arr.tobytes()
        if key not in self._full:
            self._full[key] = distance_transform_edt(arr, sampling=self.spacing).astype(np.float32)
        return self._full[key]

    def within_box(self, arr: np.ndarray, box: tuple[slice, ...]) -> np.ndarray:
        """The transform of ``arr`` restricted to ``box``; exact when every voxel just outside the box is 0."""
        if all(b.start == 0 and b.stop == n for b, n in zip(box, arr.shape)):
            return self.full(arr)
        cached = self._full.get(arr.tobytes())
        if cached is not None:
            return cached[box]
        return distance_transform_edt(arr[box], sampling=self.spacing).astype(np.float32)


def _grown_bounding_box(mask: np.ndarray) -> tuple[slice, ...]:
    box = []
    for axis in range(mask.ndim):
        hit = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        box.append(slice(max(int(hit[0]) - 1, 0), min(int(hit[-1]) + 2, mask.shape[axis])))
    return tuple(box)


def _outside_distance(mask: np.ndarray, cache: _EDTCache) -> np.ndarray:
    """At an outside voxel: the distance to the nearest object voxel."""
    return cache.full(~mask)


def _inside_distance(mask: np.ndarray, outside: np.ndarray, cache: _EDTCache) -> np.ndarray:
    """At an object voxel: the distance to the nearest annotated outside voxel (0 elsewhere in the box)."""
    inside_input = ~outside  # zeros: the annotated outside voxels
    box = _grown_bounding_box(inside_input)
    d_in = np.zeros(mask.shape, np.float32)
    d_in[box] = cache.within_box(inside_input, box)
    return d_in


def _boundary(mask: np.ndarray, outside: np.ndarray) -> np.ndarray:
    """Object voxels with a face neighbour that is an annotated outside voxel."""
    return mask & binary_dilation(outside, generate_binary_structure(mask.ndim, 1))


def signed_distance(mask: np.ndarray, known: np.ndarray | None = None,
                    spacing: Sequence[float] | None = None) -> np.ndarray:
    """Eq. 1 for one binary mask, not normalised: -distance to the nearest (annotated) outside voxel for
    object voxels, +distance to the nearest object voxel for outside voxels, 0 on the boundary. The mask must
    hold at least one object voxel and one annotated outside voxel."""
    known = np.ones(np.shape(mask), bool) if known is None else np.asarray(known, bool)
    mask = np.asarray(mask, bool) & known
    outside = known & ~mask
    if not mask.any() or not outside.any():
        raise ValueError("signed_distance needs at least one object voxel and one annotated outside voxel")
    cache = _EDTCache(spacing)
    sdf = np.where(mask, -_inside_distance(mask, outside, cache), _outside_distance(mask, cache))
    sdf[_boundary(mask, outside)] = 0
    return sdf


def normalized_signed_distances(masks: Sequence[np.ndarray], known: np.ndarray | None = None,
                                spacing: Sequence[float] | None = None) -> np.ndarray:
    """One normalised SDF per binary mask (shape (len(masks), *spatial), float32, values in [-1, 1]).

    ``known`` marks annotated voxels (False: ignore label). See the module docstring for the conventions."""
    shape = np.shape(masks[0])
    known = np.ones(shape, bool) if known is None else np.asarray(known, bool)
    masks = [np.asarray(m, bool) & known for m in masks]
    cache = _EDTCache(spacing)
    out = np.empty((len(masks), *shape), np.float32)
    regular = []
    for c, mask in enumerate(masks):
        if not mask.any():
            out[c] = 1.0
        elif not (known & ~mask).any():
            out[c] = -1.0
        else:
            regular.append(c)
    # whole-patch transforms first: a later inside transform of the same array is then a lookup
    d_outs = {c: _outside_distance(masks[c], cache) for c in regular}
    # classes that partition the annotated voxels: the nearest voxel outside class c is the nearest voxel of some
    # other class, so the inside distances are minima of the other classes' outside distances (no transform)
    partition = len(regular) > 1 and np.array_equal(np.add.reduce([masks[c] for c in regular], dtype=np.uint8),
                                                    known.astype(np.uint8))
    for c in regular:
        mask = masks[c]
        outside = known & ~mask
        if partition:
            d_in = np.minimum.reduce([d_outs[o] for o in regular if o != c])
        else:
            d_in = _inside_distance(mask, outside, cache)
        sdf = np.zeros(shape, np.float32)
        sdf[outside] = d_outs[c][outside] / d_outs[c][outside].max()
        sdf[mask] = -d_in[mask] / d_in[mask].max()
        sdf[_boundary(mask, outside)] = 0.0
        out[c] = sdf
    return out


class SignedDistanceTransform(SegOnlyTransform):
    """Appends the normalised one-vs-rest SDF of the full-resolution target to the segmentation target.

    Runs last in the labeled training pipeline (after region conversion and deep-supervision downsampling), in
    the augmentation workers. The segmentation becomes a list ``[*deep_supervision_targets, sdf]`` (a single
    target becomes ``[target, sdf]``); ``sdf`` has one float32 channel per segmentation output channel.

    ``labels``: the softmax classes in output-channel order (nnU-Net's ``label_manager.all_labels``); None for
    region-based targets, whose channels are the regions (followed by the ignore channel when
    ``ignore_label`` is set). ``spacing``: the configuration's voxel spacing (distances in its units).
    """

    def __init__(self, labels: Sequence[int] | None = None, ignore_label: int | None = None,
                 spacing: Sequence[float] | None = None):
        super().__init__()
        self.labels = None if labels is None else [int(v) for v in labels]
        self.ignore_label = ignore_label
        self.spacing = None if spacing is None else [float(s) for s in spacing]

    def masks_and_known(self, seg: np.ndarray) -> tuple[list[np.ndarray], np.ndarray | None]:
        if self.labels is not None:
            labels = seg[0]
            known = None if self.ignore_label is None else labels != self.ignore_label
            return [labels == v for v in self.labels], known
        seg = seg.astype(bool, copy=False)
        if self.ignore_label is None:
            return list(seg), None
        return list(seg[:-1]), ~seg[-1]

    def _apply_to_segmentation(self, segmentation, **params):
        targets = list(segmentation) if isinstance(segmentation, (list, tuple)) else [segmentation]
        masks, known = self.masks_and_known(targets[0].numpy())
        spacing = self.spacing if self.spacing is not None and len(self.spacing) == masks[0].ndim else None
        return [*targets, torch.from_numpy(normalized_signed_distances(masks, known, spacing))]
