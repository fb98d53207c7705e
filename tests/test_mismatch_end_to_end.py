"""MisMatchTrainer through nnU-Net's own commands: train, interrupt, ``--c`` resume, validate with calibration,
predict with probabilities, and the calibration command on the prediction folder."""

from __future__ import annotations

import json
import os
import signal
import subprocess

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from conftest import BIN, SHORT
from test_end_to_end import _wait_for

pytestmark = pytest.mark.slow


def _ece(conf: np.ndarray, correct: np.ndarray) -> float:
    """ECE with 15 equal-width bins, written out independently of the package."""
    total = 0.0
    for m in range(15):
        inside = (conf > m / 15) & (conf <= (m + 1) / 15) if m else (conf <= 1 / 15)
        if inside.any():
            total += inside.sum() / conf.size * abs(correct[inside].mean() - conf[inside].mean())
    return total


def _read(path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def test_train_interrupt_resume_predict_calibrate(demo, tmp_path):
    hp = {"num_epochs": 2, "num_iterations_per_epoch": 2, "num_val_iterations_per_epoch": 1, "save_every": 1}
    out = demo.results("MisMatchTrainer")
    env = {**os.environ, **demo.vars, "nnUNet_ssl_hparams": json.dumps(hp)}
    proc = subprocess.Popen([str(BIN / "nnUNetv2_train"), str(demo.dataset_id), "3d_fullres", "0", "-tr",
                             "MisMatchTrainer", "-device", "cpu"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    _wait_for(out / "checkpoint_latest.pth", proc)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "checkpoint_final.pth").exists()

    demo.run("nnUNetv2_train", str(demo.dataset_id), "3d_fullres", "0", "-tr", "MisMatchTrainer", "-device", "cpu",
             "--c", hparams=hp)
    final = torch.load(out / "checkpoint_final.pth", weights_only=False)
    assert final["current_epoch"] == 2
    weights = final["network_weights"]
    assert not weights["decoder.region_based"]  # softmax dataset: the two decoders are averaged as softmax
    assert any(k.startswith("decoder.erosion.stages.0.side.") for k in weights)
    log = final["logging"]
    assert len(log["loss_consistency"]) == 2 and all(np.isfinite(log["loss_consistency"]))
    assert final["nnunet_ssl"]["hparams"]["consistency_weight"] == 10.0

    # the final validation wrote calibration next to summary.json and removed the probabilities it needed
    val = out / "validation"
    assert (val / "summary.json").is_file() and (val / "reliability_diagram.png").stat().st_size > 0
    calibration = json.loads((val / "calibration.json").read_text())
    assert set(calibration["pooled"]["classes"]) == {"1", "2"}
    assert not list(val.glob("*.npz")) and not list(val.glob("*.pkl"))

    pred = tmp_path / "pred"
    demo.run("nnUNetv2_predict", "-i", str(demo.raw / "imagesTs"), "-o", str(pred), "-d", str(demo.dataset_id),
             "-c", "3d_fullres", "-tr", "MisMatchTrainer", "-f", "0", "-device", "cpu", "--disable_tta",
             "--save_probabilities")
    cases = sorted(p.name[: -len(".nii.gz")] for p in (demo.raw / "labelsTs").iterdir())
    proc = demo.run("nnunet_ssl", "calibration", "-ref", str(demo.raw / "labelsTs"), "-pred", str(pred))
    assert "foreground" in proc.stdout
    result = json.loads((pred / "calibration.json").read_text())
    assert [c["case"] for c in result["metric_per_case"]] == cases
    conf, correct, conf1, correct1 = [], [], [], []
    for case in cases:
        probs = np.load(pred / f"{case}.npz")["probabilities"].astype(np.float64)
        ref = _read(demo.raw / "labelsTs" / f"{case}.nii.gz")
        seg = probs.argmax(0)
        assert np.array_equal(seg, _read(pred / f"{case}.nii.gz"))  # the written segmentation is their argmax
        fg = (ref != 0) | (seg != 0)
        conf.append(probs.max(0)[fg])
        correct.append((seg == ref)[fg])
        one = (ref == 1) | (seg == 1)
        conf1.append(probs.max(0)[one])
        correct1.append((seg == ref)[one])
    assert result["pooled"]["foreground"]["ECE"] == pytest.approx(_ece(np.concatenate(conf), np.concatenate(correct)),
                                                                  rel=1e-4)
    assert result["pooled"]["classes"]["1"]["ECE"] == pytest.approx(
        _ece(np.concatenate(conf1), np.concatenate(correct1)), rel=1e-4)
    assert (pred / "reliability_diagram.png").stat().st_size > 0


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
        ref = _read(env.pp / "gt_segmentations" / f"{case}.nii.gz")
        valid = ref != 3  # the ignore label
        for channel, labels in enumerate(([1, 2], [2])):
            inside, member = probs[channel] > 0.5, np.isin(ref, labels)
            keep = valid & (inside | member)
            conf.append(np.maximum(probs[channel], 1 - probs[channel])[keep])
            correct.append((inside == member)[keep])
    assert result["pooled"]["foreground"]["ECE"] == pytest.approx(_ece(np.concatenate(conf), np.concatenate(correct)),
                                                                  rel=1e-4)

