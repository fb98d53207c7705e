"""What LocalContrastiveTrainer does with a batch besides nnU-Net's segmentation loss.

- **Outside the nonzero mask.** nnU-Net's preprocessed label maps hold -1 outside the nonzero mask (and its loader
  pads with -1); its training transforms turn -1 into background at the end. Eq. 3 samples pixels of a class and
  averages them into class means, and background pixels outside the body are not the background class of the image.
  ``keep_outside_label`` therefore changes that last step of the training pipeline to write an extra label value
  ``outside_label(...)`` instead (and, for regions, an extra last channel), and ``segmentation_target`` turns it back
  into exactly nnU-Net's target for the segmentation loss.
- **Classes.** ``class_membership`` turns a (pseudo-)label batch into the (B, K, *spatial) membership mask of the
  loss: the foreground labels (or regions), optionally background first; voxels of the ignore label and outside the
  nonzero mask belong to no class.
- **Intensity changes.** ``brightness_contrast``: random brightness and contrast per image and channel on the batch
  of the contrastive term (section IV.E).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from batchgeneratorsv2.transforms.utils.compose import ComposeTransforms
from batchgeneratorsv2.transforms.utils.remove_label import RemoveLabelTransform
from batchgeneratorsv2.transforms.utils.seg_to_regions import ConvertSegmentationToRegionsTransform
from nnunetv2.utilities.label_handling.label_handling import LabelManager


def outside_label(foreground_labels: Sequence[int], ignore_label: int | None) -> int:
    """The label value that marks voxels outside the nonzero mask in training targets: one above every label."""
    return max([0, *foreground_labels, *([ignore_label] if ignore_label is not None else [])]) + 1


def keep_outside_label(transforms: ComposeTransforms, label: int, has_regions: bool) -> ComposeTransforms:
    """Make nnU-Net's training pipeline mark outside-mask voxels (-1) with ``label`` instead of background; with
    regions, as an extra last channel after the regions (and the ignore channel). Nothing else changes."""
    removers = [t for t in transforms.transforms
                if isinstance(t, RemoveLabelTransform) and t.label_value == -1 and t.set_to == 0]
    converters = [t for t in transforms.transforms if isinstance(t, ConvertSegmentationToRegionsTransform)]
    if len(removers) != 1 or (has_regions and len(converters) != 1):
        raise RuntimeError("nnU-Net's training transforms do not have the expected layout (one RemoveLabelTransform "
                           "of -1 to 0, and one ConvertSegmentationToRegionsTransform for regions); this nnU-Net "
                           "version is not supported by LocalContrastiveTrainer.")
    removers[0].set_to = label
    if has_regions:
        converters[0].regions.append(torch.Tensor([label]))
    return transforms


def segmentation_target(target: torch.Tensor, label: int, has_regions: bool) -> torch.Tensor:
    """nnU-Net's own training target from one with the outside label: background there again (labels), or the
    outside channel removed (regions)."""
    if has_regions:
        return target[:, :-1]
    return torch.where(target == label, torch.zeros_like(target), target)


def outside_mask(target: torch.Tensor, label: int, has_regions: bool) -> torch.Tensor:
    """(B, 1, *spatial) bool: voxels outside the nonzero mask (or padding) in a target with the outside label."""
    return target[:, -1:].bool() if has_regions else target == label


def class_membership(target: torch.Tensor, label_manager: LabelManager, outside: int,
                     include_background: bool = False) -> torch.Tensor:
    """(B, K, *spatial) bool from a full-resolution training target with the outside label.

    Classes: the foreground labels (label-based datasets) or the foreground regions, each region a class (regions may
    overlap); with ``include_background`` first the background (label 0, or no region). Voxels of the ignore label
    and outside the nonzero mask belong to no class."""
    lm = label_manager
    if lm.has_regions:
        n = len(lm.foreground_regions)
        regions = target[:, :n].bool()
        excluded = target[:, -1:].bool()  # outside channel
        if lm.has_ignore_label:
            excluded = excluded | target[:, n:n + 1].bool()  # ignore channel (nnU-Net puts it after the regions)
        member = regions
        if include_background:
            member = torch.cat((~regions.any(1, keepdim=True), regions), 1)
        return member & ~excluded
    seg = target[:, :1]
    labels = ([0] if include_background else []) + list(lm.foreground_labels)
    return seg == torch.as_tensor(labels, device=seg.device, dtype=seg.dtype).view(1, -1, *[1] * (seg.ndim - 2))


def brightness_contrast(x: torch.Tensor, brightness: float, contrast: float,
                        generator: torch.Generator | None = None) -> torch.Tensor:
    """Random brightness and contrast change per image and channel (section IV.E, as the paper's code does it):
    x + b (b ~ U(-brightness, brightness)), then (x - mean) * c + mean (c ~ U(1 - contrast, 1 + contrast)).

    The paper's images are scaled to about [0, 1]; nnU-Net's are normalised (unit standard deviation for z-score
    normalisation), so the same numbers are a milder change here. Applied on the device to the whole batch at once.
    """
    shape = (x.shape[0], x.shape[1], *[1] * (x.ndim - 2))
    b = (torch.rand(shape, generator=generator, device=x.device) * 2 - 1) * brightness
    c = 1 + (torch.rand(shape, generator=generator, device=x.device) * 2 - 1) * contrast
    x = x + b.to(x.dtype)
    mean = x.mean(dim=tuple(range(2, x.ndim)), keepdim=True)
    return (x - mean) * c.to(x.dtype) + mean
