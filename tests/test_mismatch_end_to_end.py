"""MisMatchTrainer on a region-based dataset with an ignore label through ``nnUNetv2_train --npz``: sigmoid
averaging of the decoders and the final validation's calibration. Its interruption, ``--c`` resume, prediction with
probabilities and the calibration command on the prediction folder are in ``test_interruption.py``."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import SHORT, ece_15_bins, read_image

pytestmark = pytest.mark.slow


def test_regions_ignore_label_validation_calibration(demo_regions_ignore):
    env = demo_regions_ignore
    env.run("nnUNetv2_train", str(env.dataset_id), "3d_fullres", "0", "-tr", "MisMatchTrainer", "-device", "cpu",
            "--npz", hparams=SHORT)
    out = env.results("MisMatchTrainer")
    ckpt = torch.load(out / "checkpoint_final.pth", weights_only=False)
    assert ckpt["network_weights"]["decoder.region_based"]  # sigmoid averaging, restored by the predictor
    assert np.isfinite(ckpt["logging"]["loss_consistency"][0])
    val = out / "validation"
    result = json.loads((val / "calibration.json").read_text())
    assert set(result["pooled"]["classes"]) == {"(1, 2)", "2"}
    # --npz asked for the probabilities: they stay; recompute the foreground ECE independently from them
    conf, correct = [], []
    for entry in result["metric_per_case"]:
        case = entry["case"]
        probs = np.load(val / f"{case}.npz")["probabilities"].astype(np.float64)
        ref = read_image(env.pp / "gt_segmentations" / f"{case}.nii.gz")
        valid = ref != 3  # the ignore label
        for channel, labels in enumerate(([1, 2], [2])):
            inside, member = probs[channel] > 0.5, np.isin(ref, labels)
            keep = valid & (inside | member)
            conf.append(np.maximum(probs[channel], 1 - probs[channel])[keep])
            correct.append((inside == member)[keep])
    assert result["pooled"]["foreground"]["ECE"] == pytest.approx(
        ece_15_bins(np.concatenate(conf), np.concatenate(correct)), rel=1e-4)

