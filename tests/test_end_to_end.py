"""MuSTTrainer through nnU-Net's own commands: train, interrupt, ``--c`` resume, predict, evaluate."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import numpy as np
import pytest
import torch
from conftest import BIN, SHORT

from nnunet_ssl.training.ramps import linear_rampup

pytestmark = pytest.mark.slow


def _wait_for(path, proc, timeout=600):
    start = time.time()
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"training ended (rc {proc.returncode}) before {path.name} appeared:\n"
                                 f"{proc.stdout.read()[-3000:]}")
        if time.time() - start > timeout:
            raise AssertionError(f"{path} did not appear within {timeout} s")
        time.sleep(0.1)


def test_train_interrupt_resume_predict_evaluate(demo, tmp_path):
    hp = {"num_epochs": 3, "num_iterations_per_epoch": 2, "num_val_iterations_per_epoch": 1, "save_every": 1,
          "rampup_fraction": 1.0}
    out = demo.results("MuSTTrainer")
    env = {**os.environ, **demo.vars, "nnUNet_ssl_hparams": json.dumps(hp)}
    proc = subprocess.Popen([str(BIN / "nnUNetv2_train"), str(demo.dataset_id), "3d_fullres", "0", "-tr",
                             "MuSTTrainer", "-device", "cpu"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    _wait_for(out / "checkpoint_latest.pth", proc)
    os.killpg(proc.pid, signal.SIGKILL)  # a hard interruption mid-training (no clean-up code runs)
    proc.wait()
    assert not (out / "checkpoint_final.pth").exists()
    interrupted = torch.load(out / "checkpoint_latest.pth", weights_only=False)
    resumed_from = interrupted["current_epoch"]
    assert 1 <= resumed_from < 3

    demo.run("nnUNetv2_train", str(demo.dataset_id), "3d_fullres", "0", "-tr", "MuSTTrainer", "-device", "cpu",
             "--c", hparams=hp)
    final = torch.load(out / "checkpoint_final.pth", weights_only=False)
    assert final["current_epoch"] == 3
    assert final["nnunet_ssl"]["hparams"]["num_epochs"] == 3
    log = final["logging"]
    assert len(log["train_losses"]) == 3 and len(log["loss_consistency"]) == 3
    # the ramp continued from the restored iteration count: the logged epoch mean of w_u matches the schedule
    for epoch in range(3):
        expected = np.mean([3.0 * linear_rampup(epoch * 2 + i, 6) for i in range(2)])
        assert log["consistency_weight"][epoch] == pytest.approx(expected)
    logs = sorted(out.glob("training_log_*.txt"))
    assert any(f"Epoch {resumed_from}" in p.read_text() and "Epoch 0" not in p.read_text() for p in logs)
    assert (out / "progress.png").stat().st_size > 0
    assert json.loads((out / "ssl_hparams.json").read_text())["hparams"]["save_every"] == 1
    assert (out / "validation" / "summary.json").exists()  # nnU-Net's final validation ran

    pred = tmp_path / "pred"
    demo.run("nnUNetv2_predict", "-i", str(demo.raw / "imagesTs"), "-o", str(pred), "-d", str(demo.dataset_id),
             "-c", "3d_fullres", "-tr", "MuSTTrainer", "-f", "0", "-device", "cpu", "--disable_tta",
             "-npp", "3", "-nps", "3")  # nnU-Net's default worker processes (the other tests predict without)
    predicted = sorted(p.name for p in pred.glob("*.nii.gz"))
    assert predicted == sorted(p.name for p in (demo.raw / "labelsTs").iterdir())
    demo.run("nnUNetv2_evaluate_folder", str(demo.raw / "labelsTs"), str(pred), "-djfile",
             str(pred / "dataset.json"), "-pfile", str(pred / "plans.json"))
    summary = json.loads((pred / "summary.json").read_text())
    assert set(summary["mean"]) == {"1", "2"}
    assert 0.0 <= summary["foreground_mean"]["Dice"] <= 1.0


def test_2d_configuration_trains(demo):
    demo.run("nnUNetv2_train", str(demo.dataset_id), "2d", "0", "-tr", "MuSTTrainer", "-device", "cpu",
             hparams=SHORT)
    out = demo.results("MuSTTrainer", "2d")
    assert (out / "checkpoint_final.pth").exists()
    assert (demo.pp / "nnUNetPlans_2d_unlabeled" / "manifest.json").exists()


def test_regions_and_ignore_label(demo_regions_ignore):
    env = demo_regions_ignore
    env.run("nnUNetv2_train", str(env.dataset_id), "3d_fullres", "0", "-tr", "MuSTTrainer", "-device", "cpu",
            hparams=SHORT)
    ckpt = torch.load(env.results("MuSTTrainer") / "checkpoint_final.pth", weights_only=False)
    assert np.isfinite(ckpt["logging"]["loss_consistency"][0]) and np.isfinite(ckpt["logging"]["train_losses"][0])
    summary = json.loads((env.results("MuSTTrainer") / "validation" / "summary.json").read_text())
    # nnU-Net names a region by its label list as written in dataset.json: "organ": [1, 2], "lesion": 2
    assert set(summary["mean"]) == {"(1, 2)", "2"}
