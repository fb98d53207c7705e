"""Pairs of patches for POPCORN's bottleneck consistency (eq. 2), drawn by nnU-Net's own data loader.

Section 2.2: "Xi, Xj are image patches randomly selected as either different augmented versions of the same patch,
or patches from different images extracted from the same region and with the same orientation". The planned batch
of B patches holds floor(B / 2) such pairs at positions (2k, 2k + 1); with an odd B the last patch is drawn as
nnU-Net draws it and takes part in the segmentation loss only. Per pair, with probability
``same_patch_probability``:

- same patch: patch 2k + 1 is patch 2k again (same case, same crop);
- otherwise two images: patch 2k + 1 comes from another training case drawn uniformly, cropped around the same
  *relative* position (the crop centre at the same fraction of each axis of the preprocessed image, which nnU-Net
  crops to the nonzero region: the closest it has to "the same region" without registration), clipped to the
  range nnU-Net's loader allows.

Both patches of a pair go through nnU-Net's augmentation pipeline (``get_training_transforms``, unchanged) with
the *same* geometric parameters (crop, rotation, scaling, elastic deformation, mirroring, 90-degree rotations,
axis transpositions: "the same orientation", so that h(X_i) and h(X_j) are compared position by position) and
independently drawn intensity augmentations (noise, blur, brightness, contrast, resolution, gamma: the
"different augmented versions"; the paper's augmentations are of this kind). Patch 2k is centred on foreground
with the probability with which nnU-Net's loader centres a patch of this batch size on foreground.

Cost: the pairs are formed inside the planned batch, so an iteration costs what nnU-Net's does (same forward
pass, same memory; h(X) is a by-product of the forward, eq. 2-4 are a few reductions). The price is diversity:
the batch holds floor(B / 2) independent anchors instead of B (half of the pairs are one patch twice).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from batchgeneratorsv2.transforms.base.basic_transform import BasicTransform
from batchgeneratorsv2.transforms.spatial.mirroring import MirrorTransform
from batchgeneratorsv2.transforms.spatial.rot90 import Rot90Transform
from batchgeneratorsv2.transforms.spatial.spatial import SpatialTransform
from batchgeneratorsv2.transforms.spatial.transpose import TransposeAxesTransform
from batchgeneratorsv2.transforms.utils.compose import ComposeTransforms
from batchgeneratorsv2.transforms.utils.random import RandomTransform
from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader

GEOMETRIC_TRANSFORMS = (SpatialTransform, MirrorTransform, Rot90Transform, TransposeAxesTransform)

FRESH, RECORD, REPLAY = "fresh", "record", "replay"


@dataclass
class PairingState:
    """What the geometric transforms of the sample being augmented do: draw (``fresh``), draw and remember
    (``record``, the first patch of a pair) or reuse the remembered parameters (``replay``, the second)."""

    mode: str = FRESH


class SharedParameters(BasicTransform):
    """Wraps one transform so that both patches of a pair get the same random parameters."""

    def __init__(self, transform: BasicTransform, state: PairingState):
        super().__init__()
        self.transform = transform
        self.state = state
        self.recorded: dict = {}

    def __call__(self, **data_dict) -> dict:
        if self.state.mode == REPLAY:
            params = self.recorded
        else:
            params = self.transform.get_parameters(**data_dict)
            if self.state.mode == RECORD:
                self.recorded = params
        return self.transform.apply(data_dict, **params)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.transform!r})"


def _is_geometric(t: BasicTransform) -> bool:
    if isinstance(t, SharedParameters):
        return True
    if isinstance(t, RandomTransform):
        return _is_geometric(t.transform)
    if isinstance(t, ComposeTransforms):
        return any(_is_geometric(x) for x in t.transforms)
    return isinstance(t, GEOMETRIC_TRANSFORMS)


def share_geometry(transforms: BasicTransform, state: PairingState) -> BasicTransform:
    """Wrap every geometric transform of nnU-Net's pipeline (also inside ``RandomTransform``, whose coin is then
    shared as well) in ``SharedParameters``; the others are left as they are. Modifies ``transforms``."""
    if isinstance(transforms, ComposeTransforms):
        transforms.transforms = [share_geometry(t, state) for t in transforms.transforms]
        return transforms
    if isinstance(transforms, RandomTransform):
        if not _is_geometric(transforms.transform):
            return transforms
        transforms.transform = share_geometry(transforms.transform, state)
        return SharedParameters(transforms, state)
    if isinstance(transforms, GEOMETRIC_TRANSFORMS):
        return SharedParameters(transforms, state)
    return transforms


def foreground_share(batch_size: int, oversample_foreground_percent: float, probabilistic: bool) -> float:
    """Expected share of patches nnU-Net's loader centres on foreground in a batch of this size (it forces the last
    ``batch_size - round(batch_size * (1 - percent))`` of them, or each with probability ``percent``)."""
    if probabilistic:
        return oversample_foreground_percent
    return (batch_size - round(batch_size * (1 - oversample_foreground_percent))) / batch_size


@dataclass
class _Pair:
    same_patch: bool
    force_fg: bool


class PairedDataLoader(nnUNetDataLoader):
    """nnU-Net's data loader whose batches hold POPCORN's pairs (see the module docstring). It only chooses keys,
    crops and shared parameters; loading, cropping, padding and augmenting are nnU-Net's (``generate_train_batch``
    asks for the keys once per batch, then for each sample in order its foreground decision, crop and
    augmentation)."""

    def __init__(self, *args, same_patch_probability: float = 0.5, **kwargs):
        super().__init__(*args, **kwargs)
        if self.batch_size < 2:
            raise ValueError(f"POPCORN pairs patches inside a batch and needs a batch size >= 2, got "
                             f"{self.batch_size}")
        if not 0.0 <= same_patch_probability <= 1.0:
            raise ValueError(f"same_patch_probability = {same_patch_probability} must lie in [0, 1]")
        self.same_patch_probability = same_patch_probability
        self.num_pairs = self.batch_size // 2
        self.pair_foreground_probability = foreground_share(
            self.batch_size, self.oversample_foreground_percent,
            kwargs.get("probabilistic_oversampling", False))
        self._nnunet_do_oversample = self.get_do_oversample
        self.get_do_oversample = self._pair_do_oversample
        self._position = {k: i for i, k in enumerate(self.indices)}
        self.pairing = PairingState()
        if self.transforms is not None:
            self.transforms = share_geometry(self.transforms, self.pairing)
        self._pairs: list[_Pair] = []
        self._sample = 0
        self._anchor: tuple[list[int], tuple[int, ...]] | None = None

    # ---------------------------------------------------------------- what nnU-Net's loader asks for
    def get_indices(self):
        keys = [str(k) for k in super().get_indices()]
        self._pairs, self._sample = [], 0
        for k in range(self.num_pairs):
            same = len(self.indices) < 2 or np.random.uniform() < self.same_patch_probability
            if same:
                keys[2 * k + 1] = keys[2 * k]
            else:  # uniform over the other cases
                r = np.random.randint(len(self.indices) - 1)
                keys[2 * k + 1] = self.indices[r if r < self._position[keys[2 * k]] else r + 1]
            self._pairs.append(_Pair(same, bool(np.random.uniform() < self.pair_foreground_probability)))
        return keys

    def _pair_do_oversample(self, sample_idx: int) -> bool:
        if sample_idx >= 2 * self.num_pairs:
            return self._nnunet_do_oversample(sample_idx)
        return self._pairs[sample_idx // 2].force_fg if sample_idx % 2 == 0 else False

    def get_bbox(self, data_shape, force_fg: bool, class_locations, overwrite_class=None, verbose: bool = False):
        j = self._sample
        self._sample += 1
        if j >= 2 * self.num_pairs:
            self.pairing.mode = FRESH
            return super().get_bbox(data_shape, force_fg, class_locations, overwrite_class, verbose)
        if j % 2 == 0:
            self.pairing.mode = RECORD
            lbs, ubs = super().get_bbox(data_shape, force_fg, class_locations, overwrite_class, verbose)
            self._anchor = (list(lbs), tuple(data_shape))
            return lbs, ubs
        self.pairing.mode = REPLAY
        anchor_lbs, anchor_shape = self._anchor
        if self._pairs[j // 2].same_patch:
            lbs = list(anchor_lbs)
        else:
            lbs = self.same_relative_position(anchor_lbs, anchor_shape, data_shape)
        return lbs, [lb + p for lb, p in zip(lbs, self.patch_size)]

    # ---------------------------------------------------------------- helpers
    def bbox_range(self, data_shape) -> tuple[list[int], list[int]]:
        """The lowest and highest lower corner nnU-Net's ``get_bbox`` may choose for an image of this shape."""
        need_to_pad = self.need_to_pad.copy()
        for d in range(len(data_shape)):
            if need_to_pad[d] + data_shape[d] < self.patch_size[d]:
                need_to_pad[d] = self.patch_size[d] - data_shape[d]
        lbs = [-need_to_pad[d] // 2 for d in range(len(data_shape))]
        ubs = [data_shape[d] + need_to_pad[d] // 2 + need_to_pad[d] % 2 - self.patch_size[d]
               for d in range(len(data_shape))]
        return lbs, ubs

    def same_relative_position(self, anchor_lbs, anchor_shape, data_shape) -> list[int]:
        """Lower corner of the crop whose centre sits at the same fraction of each axis as the anchor's."""
        low, high = self.bbox_range(data_shape)
        lbs = []
        for d, size in enumerate(data_shape):
            centre = (anchor_lbs[d] + self.patch_size[d] / 2) / anchor_shape[d] * size
            lbs.append(int(np.clip(round(centre - self.patch_size[d] / 2), low[d], high[d])))
        return lbs
