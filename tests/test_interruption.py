"""Every trainer survives a hard kill: SIGKILL of the whole training process group at a point drawn for it (inside
an iteration, while a checkpoint is written, while unlabeled images are preprocessed, while a pseudo-label is
written), then ``nnUNetv2_train ... --c`` restores exactly what the checkpoint holds, trains to the end and the model
predicts with ``nnUNetv2_predict``."""

from __future__ import annotations

import json
import random
import shutil
import signal
import sys
import zlib

import blosc2
import numpy as np
import pytest
import torch
from conftest import REPO

from nnunet_ssl.data.unlabeled import unlabeled_preprocessed_folder
from nnunet_ssl.trainers import TRAINERS

pytestmark = pytest.mark.slow

INJECT = str(REPO / "tests" / "fault_injection.py")
IN_PROCESS = {"nnUNet_n_proc_DA": "0"}  # augmentation in the training process: quicker to start for a few iterations
SCHEDULE = {"num_epochs": 3, "num_iterations_per_epoch": 2, "num_val_iterations_per_epoch": 1, "save_every": 1}
# trainer: (kill point, extra hyper-parameters)
CASES = {
    "MuSTTrainer": ("preprocessing", {}),
    "POPCORNTrainer": ("pseudo_label", {"first_step_epochs": 1, "epochs_per_round": 1, "selection_size": 2}),
    "LocalContrastiveTrainer": ("pseudo_label", {"supervised_fraction": 0.34, "pseudo_label_rounds": 2,
                                                 "refresh_every": 2}),
    "UGMCLTrainer": ("iteration", {"mc_passes": 2}),
    "MeanTeacherTrainer": ("checkpoint", {"export_teacher": True}),
    "UAMTTrainer": ("checkpoint", {"mc_passes": 2}),
    "DTCTrainer": ("iteration", {}),
    "MisMatchTrainer": ("checkpoint", {}),
    "SupervisedTrainer": ("iteration", {}),
}


def kill_occurrence(trainer: str, point: str) -> int:
    """Which occurrence of ``point`` is killed, drawn per trainer (reproducibly)."""
    rng = random.Random(zlib.crc32(trainer.encode()))
    return {
        "iteration": rng.randint(3, 5),  # an iteration of epoch 1 or 2 (epoch 0's checkpoint exists)
        "checkpoint": rng.randint(2, 3),  # the second or third checkpoint write (the first one is complete)
        "preprocessing": 1,  # one of four unlabeled cases done, the others in flight
        # POPCORN: round 2 (2 cases, 2 files each, per round); LocalContrastive: round 2 (4 cases, 2 files each)
        "pseudo_label": {"POPCORNTrainer": rng.randint(5, 8)}.get(trainer, rng.randint(9, 16)),
    }[point]


def _equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, np.ndarray):
        return np.array_equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    return a == b


@pytest.mark.parametrize("trainer", list(CASES))
def test_sigkill_then_resume_restores_state_finishes_and_predicts(trainer, demo, tmp_path):
    point, extra = CASES[trainer]
    env = demo.copy(tmp_path / "env")
    hp = {**SCHEDULE, **extra}
    unlabeled = unlabeled_preprocessed_folder(env.pp, "nnUNetPlans_3d_fullres")
    if point == "preprocessing":
        shutil.rmtree(unlabeled, ignore_errors=True)
    out = env.results(trainer)
    args = (str(env.dataset_id), "3d_fullres", "0", "-tr", trainer, "-device", "cpu")
    n = kill_occurrence(trainer, point)

    killed = env.run(sys.executable, INJECT, "kill", point, str(n), "--", *args, hparams=hp, check=False,
                     start_new_session=True, extra_env=IN_PROCESS)
    assert killed.returncode == -signal.SIGKILL, f"not killed ({killed.returncode}):\n{killed.stdout[-3000:]}" \
                                                 f"\n{killed.stderr[-3000:]}"
    assert not (out / "checkpoint_final.pth").exists()
    for f in out.glob("*.pth"):  # nothing half-written under a checkpoint's name
        torch.load(f, weights_only=False, map_location="cpu")
    if point == "preprocessing":
        manifest = json.loads((unlabeled / "manifest.json").read_text())
        assert 1 <= len(manifest["cases"]) < 4 and not (out / "checkpoint_latest.pth").exists()
    saved = torch.load(out / "checkpoint_latest.pth", weights_only=False) if point != "preprocessing" else None

    dump = tmp_path / "restored.pt"
    env.run(sys.executable, INJECT, "dump", str(dump), "--", *args, "--c", hparams=hp, extra_env=IN_PROCESS)
    restored = torch.load(dump, weights_only=False)
    final = torch.load(out / "checkpoint_final.pth", weights_only=False)
    assert final["current_epoch"] == SCHEDULE["num_epochs"]
    if saved is None:  # killed before any checkpoint: a fresh start that finished the preprocessing
        assert restored["current_epoch"] == 0
        assert len(json.loads((unlabeled / "manifest.json").read_text())["cases"]) == 4
    else:  # what the resumed trainer holds is what the checkpoint held: weights, teacher, counters, rounds
        assert restored["current_epoch"] == saved["current_epoch"] >= 1
        assert restored["global_step"] == saved["current_epoch"] * SCHEDULE["num_iterations_per_epoch"]
        assert _equal(restored["network_weights"], saved["network_weights"])
        assert _equal(restored["nnunet_ssl"], saved["nnunet_ssl"])
    state = restored["nnunet_ssl"]
    if trainer == "POPCORNTrainer":  # the rounds done before the kill, with their pseudo-label files
        cases = [c for r in state["popcorn"]["rounds"] for c in r["selected"]]
        assert cases and sorted(restored["pseudo_label_shapes"]) == sorted(cases)
    if trainer == "LocalContrastiveTrainer":
        assert state["pseudo_label_round"] == 1 and final["nnunet_ssl"]["pseudo_label_round"] == 2
        assert sorted(restored["pseudo_label_shapes"]) == sorted(state["pseudo_label_cases"])
    for case, shape in restored["pseudo_label_shapes"].items():  # one channel, the preprocessed image's grid
        assert shape[0] == 1 and shape[1:] == blosc2.open(str(unlabeled / f"{case}.b2nd")).shape[1:], case
    if "teacher" in state:
        assert "teacher" in final["nnunet_ssl"]

    pred = tmp_path / "pred"
    env.run("nnUNetv2_predict", "-i", str(env.raw / "imagesTs"), "-o", str(pred), "-d", str(env.dataset_id),
            "-c", "3d_fullres", "-tr", trainer, "-f", "0", "-device", "cpu", "--disable_tta")
    assert sorted(p.name for p in pred.glob("*.nii.gz")) == sorted(p.name for p in (env.raw / "labelsTs").iterdir())


def test_every_trainer_is_covered():
    assert set(CASES) == set(TRAINERS)
    assert {p for p, _ in CASES.values()} == {"iteration", "checkpoint", "preprocessing", "pseudo_label"}
