"""LocalContrastiveTrainer's batch handling: outside-mask label through nnU-Net's pipeline, classes, intensity changes,
and the schedule of pseudo-labelling rounds."""

import random

import numpy as np
import pytest
import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.training.nnUNetTrainer.variants.data_augmentation.nnUNetTrainerDA5 import nnUNetTrainerDA5
from nnunetv2.utilities.label_handling.label_handling import LabelManager

from nnunet_ssl.methods.local_contrastive.batch import (
    brightness_contrast,
    class_membership,
    keep_outside_label,
    outside_label,
    outside_mask,
    segmentation_target,
)
from nnunet_ssl.methods.local_contrastive.schedule import PseudoLabelSchedule
from nnunet_ssl.training.hparams import HParamError

LABELS_IGNORE = LabelManager({"background": 0, "organ": 1, "lesion": 2, "ignore": 3}, regions_class_order=None)
REGIONS_IGNORE = LabelManager({"background": 0, "organ": [1, 2], "lesion": 2, "ignore": 3}, regions_class_order=[1, 2])


def _pipeline(lm: LabelManager, trainer_cls=nnUNetTrainer):
    """nnU-Net's training pipeline (of ``trainer_cls``: nnUNetTrainer's or nnUNetTrainerDA5's augmentation)."""
    return trainer_cls.get_training_transforms(
        (12, 12, 12), (-0.5, 0.5), [[1, 1, 1], [0.5, 0.5, 0.5]], (0, 1, 2), False, use_mask_for_norm=[True],
        is_cascaded=False, foreground_labels=lm.foreground_labels,
        regions=lm.foreground_regions if lm.has_regions else None, ignore_label=lm.ignore_label)


def _run(transforms, image, seg, seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return transforms(image=image.clone(), segmentation=seg.clone())


@pytest.mark.parametrize("augmentation", [nnUNetTrainer, nnUNetTrainerDA5], ids=["default", "da5"])
@pytest.mark.parametrize("lm", [LABELS_IGNORE, REGIONS_IGNORE], ids=["labels", "regions"])
def test_outside_label_through_nnunet_pipeline(lm, augmentation):
    g = torch.Generator().manual_seed(0)
    seg = torch.randint(0, 4, (1, 16, 16, 16), generator=g).to(torch.int16)
    seg[:, :5] = -1  # outside the nonzero mask, as nnU-Net's preprocessing writes it
    image = torch.randn(1, 16, 16, 16, generator=g)
    image[seg < 0] = 0
    outside = outside_label(lm.foreground_labels, lm.ignore_label)
    assert outside == 4  # one above the ignore label
    for seed in range(4):
        ours = _run(keep_outside_label(_pipeline(lm, augmentation), outside, lm.has_regions), image, seg, seed)
        nnunet = _run(_pipeline(lm, augmentation), image, seg, seed)
        assert torch.equal(ours["image"], nnunet["image"])  # the same random augmentation
        for t_ours, t_nnunet in zip(ours["segmentation"], nnunet["segmentation"]):  # every deep-supervision scale
            restored = segmentation_target(t_ours[None], outside, lm.has_regions)[0]
            assert torch.equal(restored, t_nnunet)  # exactly nnU-Net's target for the segmentation loss
        full = ours["segmentation"][0][None]
        mask = outside_mask(full, outside, lm.has_regions)
        assert mask.any() and not mask.all()
        # outside voxels are background in nnU-Net's target, and in no class of the contrastive loss
        nn_full = nnunet["segmentation"][0][None]
        if lm.has_regions:
            assert not nn_full[:, :2][mask.expand(-1, 2, *mask.shape[2:])].any()
        else:
            assert (nn_full[mask] == 0).all()
        member = class_membership(full, lm, outside, include_background=True)
        assert not member[mask.expand_as(member)].any()


def test_keep_outside_label_rejects_unknown_pipelines():
    transforms = _pipeline(LABELS_IGNORE)
    transforms.transforms = [t for t in transforms.transforms if type(t).__name__ != "RemoveLabelTransform"]
    with pytest.raises(RuntimeError, match="not supported"):
        keep_outside_label(transforms, 4, False)


def test_class_membership_labels():
    # labels 0, 1, 2, ignore 3, outside 4
    seg = torch.tensor([0, 1, 2, 3, 4, 1]).view(1, 1, 6)
    fg = class_membership(seg, LABELS_IGNORE, 4)
    assert fg.tolist() == [[[0, 1, 0, 0, 0, 1], [0, 0, 1, 0, 0, 0]]]
    with_bg = class_membership(seg, LABELS_IGNORE, 4, include_background=True)
    assert with_bg.tolist() == [[[1, 0, 0, 0, 0, 0], [0, 1, 0, 0, 0, 1], [0, 0, 1, 0, 0, 0]]]


def test_class_membership_overlapping_regions():
    # channels: organ {1, 2}, lesion {2}, ignore, outside; voxels: bg, organ, lesion, ignore, outside
    target = torch.tensor([[0, 1, 1, 0, 0],
                           [0, 0, 1, 0, 0],
                           [0, 0, 0, 1, 0],
                           [0, 0, 0, 0, 1]], dtype=torch.bool)[None]
    member = class_membership(target, REGIONS_IGNORE, 4, include_background=True)
    assert member.tolist() == [[[1, 0, 0, 0, 0], [0, 1, 1, 0, 0], [0, 0, 1, 0, 0]]]  # a lesion voxel is organ too


def test_brightness_contrast():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 2, 5, 6, generator=g) * 3 + 1
    shifted = brightness_contrast(x, 0.3, 0.0, torch.Generator().manual_seed(1))
    delta = (shifted - x).flatten(2)
    assert torch.allclose(delta, delta[..., :1].expand_as(delta), atol=1e-5)  # one shift per image and channel
    assert delta.abs().max() <= 0.3 and delta[..., 0].std() > 0
    scaled = brightness_contrast(x, 0.0, 0.3, torch.Generator().manual_seed(1))
    mean = x.mean((2, 3), keepdim=True)
    assert torch.allclose(scaled.mean((2, 3), keepdim=True), mean, atol=1e-5)  # contrast around the mean
    factor = ((scaled - mean) / (x - mean)).flatten(2)
    assert torch.allclose(factor, factor[..., :1].expand_as(factor), atol=1e-4)
    assert ((factor - 1).abs() <= 0.3 + 1e-5).all() and factor[..., 0].std() > 0
    assert torch.allclose(brightness_contrast(x, 0.0, 0.0), x, atol=1e-6)


def _hp(**kw):
    return {"num_epochs": 4, "num_iterations_per_epoch": 5, "supervised_fraction": 0.25, "pseudo_label_rounds": 3,
            "refresh_every": None, **kw}


def test_schedule_follows_the_paper_in_proportion():
    # the paper: 5000 supervised iterations, then 3 rounds of P = 5000 -> nnU-Net's 1000 x 250 iterations
    s = PseudoLabelSchedule.from_hparams(_hp(num_epochs=1000, num_iterations_per_epoch=250), "T")
    assert [s.iteration(r) for r in range(3)] == [62500, 125000, 187500]
    s = PseudoLabelSchedule.from_hparams(_hp(), "T")  # 20 iterations: 5 supervised, rounds at 5, 10, 15
    assert [s.iteration(r) for r in range(3)] == [5, 10, 15]
    rounds, refreshed_at = 0, []
    for step in range(20):  # what the trainer does before every optimizer step
        while s.due(rounds, step):
            rounds += 1
            refreshed_at.append(step)
    assert refreshed_at == [5, 10, 15]
    assert not s.due(0, 4) and s.due(0, 5) and not s.due(1, 9) and s.due(1, 10) and not s.due(3, 19)
    s = PseudoLabelSchedule.from_hparams(_hp(supervised_fraction=0.1, refresh_every=3, pseudo_label_rounds=2), "T")
    assert (s.first, s.every, s.rounds) == (2, 3, 2)
    with pytest.raises(HParamError, match="does not fit"):
        PseudoLabelSchedule.from_hparams(_hp(refresh_every=8), "T")  # rounds at 5, 13, 21 >= 20
