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
from nnunet_ssl.methods.popcorn.trainer import PSEUDO_LABEL_FOLDER, STATE_FILE
from nnunet_ssl.trainers import TRAINERS

pytestmark = pytest.mark.slow

INJECT = str(REPO / "tests" / "fault_injection.py")
IN_PROCESS = {"nnUNet_n_proc_DA": "0"}  # augmentation in the training process: quicker to start for a few iterations
SCHEDULE = {"num_epochs": 3, "num_iterations_per_epoch": 2, "num_val_iterations_per_epoch": 1, "save_every": 1}
# trainer: (kill point, dataset fixture, configuration, extra hyper-parameters)
CASES = {
    "MuSTTrainer": ("preprocessing", "demo", "3d_fullres", {}),
    "POPCORNTrainer": ("pseudo_label", "demo", "3d_fullres",
                       {"first_step_epochs": 1, "epochs_per_round": 1, "selection_size": 2}),
    "LocalContrastiveTrainer": ("pseudo_label", "demo", "3d_fullres",
                                {"supervised_fraction": 0.34, "pseudo_label_rounds": 2, "refresh_every": 2}),
    "UGMCLTrainer": ("iteration", "demo_regions_ignore", "3d_fullres", {"mc_passes": 2}),
    "MeanTeacherTrainer": ("checkpoint", "demo", "3d_fullres", {"export_teacher": True}),
    "UAMTTrainer": ("checkpoint", "demo", "3d_fullres", {"mc_passes": 2}),
    "DTCTrainer": ("iteration", "demo", "2d", {}),
    "MisMatchTrainer": ("checkpoint", "demo", "3d_fullres", {}),
    "SupervisedTrainer": ("iteration", "demo", "3d_fullres", {}),
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


def _popcorn(out, saved, restored, final) -> None:
    """Round 1 (epoch 1) survived the kill in round 2 (epoch 2), which was redone; every case is in, with its
    files and the readable log."""
    rounds = final["nnunet_ssl"]["popcorn"]["rounds"]
    assert [r["epoch"] for r in rounds] == [1, 2] and rounds[0] == saved["nnunet_ssl"]["popcorn"]["rounds"][0]
    assert [r["selected"] for r in restored["nnunet_ssl"]["popcorn"]["rounds"]] == [rounds[0]["selected"]]
    selected = [c for r in rounds for c in r["selected"]]
    assert len(selected) == 4 and sorted(selected) == sorted(final["nnunet_ssl"]["popcorn"]["unlabeled_cases"])
    assert sorted(p.name for p in (out / PSEUDO_LABEL_FOLDER).iterdir()) == sorted(  # no partial file left
        f"{c}{suffix}" for c in selected for suffix in (".pkl", "_seg.b2nd"))
    log = json.loads((out / STATE_FILE).read_text())
    assert log["pseudo_labeled"] == selected and log["remaining"] == 0


def _local_contrastive(out, saved, restored, final) -> None:
    """Refreshes at iterations 2 and 4; killed while writing round 2, which the resumed run redid."""
    assert restored["nnunet_ssl"]["pseudo_label_round"] == 1 and final["nnunet_ssl"]["pseudo_label_round"] == 2
    assert sorted(restored["pseudo_label_shapes"]) == sorted(restored["nnunet_ssl"]["pseudo_label_cases"])
    first, second = (json.loads((out / "pseudo_labels" / f"round_{r}" / "selection.json").read_text())
                     for r in (1, 2))
    assert (first["iteration"], second["iteration"]) == (2, 4) and sorted(first["cases"]) == sorted(second["cases"])
    assert final["logging"]["contrastive_weight"] == [0.0, pytest.approx(0.1), pytest.approx(0.1)]
    resumed_log = max(out.glob("training_log_*.txt"), key=lambda p: p.stat().st_mtime).read_text()
    assert "Pseudo-labels round 2/2 at iteration 4" in resumed_log and "round 1/2" not in resumed_log


def _exported_teacher(out, saved, restored, final) -> None:
    """export_teacher: the predictor's weights are the teacher's; --c resumed the student kept apart."""
    state = final["nnunet_ssl"]
    assert _equal(final["network_weights"], state["teacher"])
    assert not _equal(final["network_weights"], state["student_weights"])


METHOD_CHECKS = {"POPCORNTrainer": _popcorn, "LocalContrastiveTrainer": _local_contrastive,
                 "MeanTeacherTrainer": _exported_teacher}


@pytest.mark.parametrize("trainer", list(CASES))
def test_sigkill_then_resume_restores_state_finishes_and_predicts(trainer, request, tmp_path):
    point, fixture, configuration, extra = CASES[trainer]
    env = request.getfixturevalue(fixture).copy(tmp_path / "env")
    hp = {**SCHEDULE, **extra}
    unlabeled = unlabeled_preprocessed_folder(env.pp, f"nnUNetPlans_{configuration}")
    if point == "preprocessing":
        shutil.rmtree(unlabeled, ignore_errors=True)
    out = env.results(trainer, configuration)
    args = (str(env.dataset_id), configuration, "0", "-tr", trainer, "-device", "cpu")
    n = kill_occurrence(trainer, point)

    killed = env.run(sys.executable, INJECT, "kill", point, str(n), "--", *args, hparams=hp, check=False,
                     start_new_session=True, extra_env=IN_PROCESS)
    assert killed.returncode == -signal.SIGKILL, f"not killed ({killed.returncode}):\n{killed.stdout[-3000:]}" \
                                                 f"\n{killed.stderr[-3000:]}"
    assert not (out / "checkpoint_final.pth").exists()
    if point == "checkpoint":  # killed mid-write: the half-written file has a temporary name
        assert list(out.glob(".ckpt.*.tmp"))
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
    assert not list(out.glob(".ckpt.*.tmp"))  # a temporary file left by the kill is gone
    if saved is None:  # killed before any checkpoint: a fresh start that finished the preprocessing
        assert restored["current_epoch"] == 0
        assert len(json.loads((unlabeled / "manifest.json").read_text())["cases"]) == 4
    else:  # what the resumed trainer holds is what the checkpoint held: weights, teacher, counters, rounds
        assert restored["current_epoch"] == saved["current_epoch"] >= 1
        assert restored["global_step"] == saved["current_epoch"] * SCHEDULE["num_iterations_per_epoch"]
        assert _equal(restored["network_weights"], saved["network_weights"])
        assert _equal(restored["nnunet_ssl"], saved["nnunet_ssl"])
    for case, shape in restored["pseudo_label_shapes"].items():  # one channel, the preprocessed image's grid
        assert shape[0] == 1 and shape[1:] == blosc2.open(str(unlabeled / f"{case}.b2nd")).shape[1:], case
    METHOD_CHECKS.get(trainer, lambda *a: None)(out, saved, restored, final)
    for key in TRAINERS[trainer].extra_log_keys:  # one finite value per epoch, across the kill
        assert len(final["logging"][key]) == SCHEDULE["num_epochs"] and np.isfinite(final["logging"][key]).all()
    assert (out / "validation" / "summary.json").is_file()

    pred = tmp_path / "pred"
    env.run("nnUNetv2_predict", "-i", str(env.raw / "imagesTs"), "-o", str(pred), "-d", str(env.dataset_id),
            "-c", configuration, "-tr", trainer, "-f", "0", "-device", "cpu", "--disable_tta")
    assert sorted(p.name for p in pred.glob("*.nii.gz")) == \
        sorted(p.name.replace("_0000", "") for p in (env.raw / "imagesTs").iterdir())


def test_every_trainer_is_covered():
    assert set(CASES) == set(TRAINERS)
    assert {c[0] for c in CASES.values()} == {"iteration", "checkpoint", "preprocessing", "pseudo_label"}
