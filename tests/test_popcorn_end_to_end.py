"""POPCORNTrainer through nnU-Net's own commands: two selection rounds, a hard kill between them, ``--c`` resume,
prediction with ``nnUNetv2_predict``."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest
import torch
from conftest import BIN

from nnunet_ssl.methods.popcorn.trainer import PSEUDO_LABEL_FOLDER, STATE_FILE

pytestmark = pytest.mark.slow


def _wait_for_epoch(checkpoint, proc, epoch: int, timeout: float = 900) -> dict:
    """Poll the (atomically written) checkpoint until it has finished ``epoch`` epochs; return it."""
    start, seen = time.time(), None
    while True:
        if proc.poll() is not None:
            raise AssertionError(f"training ended (rc {proc.returncode}) before epoch {epoch}:\n"
                                 f"{proc.stdout.read()[-3000:]}")
        if time.time() - start > timeout:
            raise AssertionError(f"{checkpoint} did not reach epoch {epoch} within {timeout} s")
        if checkpoint.exists() and checkpoint.stat().st_mtime != seen:
            seen = checkpoint.stat().st_mtime
            ckpt = torch.load(checkpoint, weights_only=False, map_location="cpu")
            if ckpt["current_epoch"] >= epoch:
                return ckpt
        time.sleep(0.1)


def test_rounds_interrupt_resume_predict(demo, tmp_path):
    # 4 unlabeled cases, 2 per round: rounds at the start of epochs 2 and 4, training ends after epoch 5
    hp = {"num_epochs": 6, "num_iterations_per_epoch": 2, "num_val_iterations_per_epoch": 1, "save_every": 1,
          "first_step_epochs": 2, "epochs_per_round": 2, "selection_size": 2}
    out = demo.results("POPCORNTrainer")
    env = {**os.environ, **demo.vars, "nnUNet_ssl_hparams": json.dumps(hp)}
    proc = subprocess.Popen([str(BIN / "nnUNetv2_train"), str(demo.dataset_id), "3d_fullres", "0", "-tr",
                             "POPCORNTrainer", "-device", "cpu"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    interrupted = _wait_for_epoch(out / "checkpoint_latest.pth", proc, 3)  # epoch 2 (round 1) is done
    os.killpg(proc.pid, signal.SIGKILL)  # a hard interruption after round 1 (no clean-up code runs)
    proc.wait()
    assert not (out / "checkpoint_final.pth").exists()
    interrupted = torch.load(out / "checkpoint_latest.pth", weights_only=False)  # the newest one
    resumed_from = interrupted["current_epoch"]
    assert 3 <= resumed_from < 6
    first_round = interrupted["nnunet_ssl"]["popcorn"]["rounds"][0]
    assert first_round["epoch"] == 2 and len(first_round["selected"]) == 2

    demo.run("nnUNetv2_train", str(demo.dataset_id), "3d_fullres", "0", "-tr", "POPCORNTrainer", "-device", "cpu",
             "--c", hparams=hp)
    final = torch.load(out / "checkpoint_final.pth", weights_only=False)
    assert final["current_epoch"] == 6
    state = final["nnunet_ssl"]["popcorn"]
    assert [r["epoch"] for r in state["rounds"]] == [2, 4]
    assert state["rounds"][0] == first_round  # round 1 was not redone
    selected = [c for r in state["rounds"] for c in r["selected"]]
    assert sorted(selected) == sorted(state["unlabeled_cases"]) and len(selected) == 4
    # the pseudo-labels of exactly these cases, and the readable log says the same as the checkpoint
    assert sorted(p.name for p in (out / PSEUDO_LABEL_FOLDER).iterdir()) == sorted(
        f"{c}{suffix}" for c in selected for suffix in (".pkl", "_seg.b2nd"))
    log = json.loads((out / STATE_FILE).read_text())
    assert log["pseudo_labeled"] == selected and log["remaining"] == 0
    assert [[e["case"] for e in r["selected"]] for r in log["rounds"]] == [r["selected"] for r in state["rounds"]]
    assert len(final["logging"]["loss_regularization"]) == 6
    resumed_logs = [p.read_text() for p in sorted(out.glob("training_log_*.txt"))
                    if f"Epoch {resumed_from}" in p.read_text() and "Epoch 0" not in p.read_text()]
    assert resumed_logs and "POPCORN round 1/2" not in resumed_logs[0]
    assert (out / "validation" / "summary.json").exists()  # nnU-Net's final validation ran

    pred = tmp_path / "pred"
    demo.run("nnUNetv2_predict", "-i", str(demo.raw / "imagesTs"), "-o", str(pred), "-d", str(demo.dataset_id),
             "-c", "3d_fullres", "-tr", "POPCORNTrainer", "-f", "0", "-device", "cpu", "--disable_tta")
    assert sorted(p.name for p in pred.glob("*.nii.gz")) == sorted(p.name for p in (demo.raw / "labelsTs").iterdir())
