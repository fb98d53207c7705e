"""Every trainer survives a hard kill: SIGKILL of the whole training process group at a point drawn for it (inside
an iteration, while a checkpoint is written, while unlabeled images are preprocessed, while a pseudo-label is
written), then ``nnUNetv2_train ... --c`` (without ``nnUNet_ssl_hparams``: the checkpoint's hyper-parameters) restores
exactly what the checkpoint holds, trains to the end with nnU-Net's final validation, and the model predicts with
``nnUNetv2_predict``. These are also the plugin's end-to-end runs through nnU-Net's commands: MuST predicts with
nnU-Net's worker processes (not sequentially) and is scored by ``nnUNetv2_evaluate_folder``; MisMatch predicts with
``--save_probabilities`` for ``nnunet_ssl calibration``; MeanTeacher trains with DA5's augmentation, which ``--c``
keeps and refuses to change; DTC runs the 2d configuration, UGMCL region-based labels with an ignore label."""

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
from conftest import REPO, Env, folder_ece, read_image

from nnunet_ssl.data.unlabeled import unlabeled_preprocessed_folder
from nnunet_ssl.methods.popcorn.trainer import PSEUDO_LABEL_FOLDER, STATE_FILE
from nnunet_ssl.trainers import TRAINERS
from nnunet_ssl.training.base import SemiSupervisedTrainer
from nnunet_ssl.training.ramps import rampup

pytestmark = pytest.mark.slow

INJECT = str(REPO / "tests" / "fault_injection.py")
IN_PROCESS = {"nnUNet_n_proc_DA": "0"}  # augmentation in the training process: quicker to start for a few iterations
SCHEDULE = {"num_epochs": 3, "num_iterations_per_epoch": 2, "num_val_iterations_per_epoch": 1, "save_every": 1}
# trainer: (kill point, dataset fixture, configuration, extra hyper-parameters)
CASES = {
    "MuSTTrainer": ("preprocessing", "demo", "3d_fullres", {"rampup_fraction": 1.0}),
    "POPCORNTrainer": ("pseudo_label", "demo", "3d_fullres",
                       {"first_step_epochs": 1, "epochs_per_round": 1, "selection_size": 2}),
    "LocalContrastiveTrainer": ("pseudo_label", "demo", "3d_fullres",
                                {"supervised_fraction": 0.34, "pseudo_label_rounds": 2, "refresh_every": 2}),
    "UGMCLTrainer": ("iteration", "demo_regions_ignore", "3d_fullres", {"mc_passes": 2}),
    "MeanTeacherTrainer": ("checkpoint", "demo", "3d_fullres", {"export_teacher": True, "augmentation": "da5"}),
    "UAMTTrainer": ("checkpoint", "demo", "3d_fullres", {"mc_passes": 2}),
    "DTCTrainer": ("iteration", "demo", "2d", {}),
    "MisMatchTrainer": ("checkpoint", "demo", "3d_fullres", {"rampup_fraction": 1.0}),
    "SupervisedTrainer": ("iteration", "demo", "3d_fullres", {}),
}
# the classes nnU-Net's summary.json names (a region by its label list as written in dataset.json)
SUMMARY_CLASSES = {"demo": {"1", "2"}, "demo_regions_ignore": {"(1, 2)", "2"}}
# trainers whose logged consistency_weight is consistency_weight * rampup(rampup, step, rampup_fraction * total)
RAMPED = ("MuSTTrainer", "MeanTeacherTrainer", "UAMTTrainer", "MisMatchTrainer")


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


def _resumed_log(out) -> str:
    """The log of the resumed run (nnU-Net starts a new log file per run)."""
    return max(out.glob("training_log_*.txt"), key=lambda p: p.stat().st_mtime).read_text()


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
    resumed_log = _resumed_log(out)
    assert "Pseudo-labels round 2/2 at iteration 4" in resumed_log and "round 1/2" not in resumed_log


def _exported_teacher(out, saved, restored, final) -> None:
    """export_teacher: the predictor's weights are the teacher's; --c resumed the student kept apart. DA5's
    augmentation, set for the first run only, is the resumed run's too."""
    state = final["nnunet_ssl"]
    assert _equal(final["network_weights"], state["teacher"])
    assert not _equal(final["network_weights"], state["student_weights"])
    assert state["hparams"]["augmentation"] == "da5"
    assert "'augmentation': 'da5'" in _resumed_log(out)


def _mismatch(out, saved, restored, final) -> None:
    """Softmax dataset: the decoders are averaged as softmax; the final validation wrote calibration next to
    summary.json and removed the probabilities it needed."""
    weights = final["network_weights"]
    assert not weights["decoder.region_based"]
    assert any(k.startswith("decoder.erosion.stages.0.side.") for k in weights)
    assert final["nnunet_ssl"]["hparams"]["consistency_weight"] == 10.0
    val = out / "validation"
    assert (val / "reliability_diagram.png").stat().st_size > 0
    assert set(json.loads((val / "calibration.json").read_text())["pooled"]["classes"]) == {"1", "2"}
    assert not list(val.glob("*.npz")) and not list(val.glob("*.pkl"))


METHOD_CHECKS = {"POPCORNTrainer": _popcorn, "LocalContrastiveTrainer": _local_contrastive,
                 "MeanTeacherTrainer": _exported_teacher, "MisMatchTrainer": _mismatch}


def _evaluated(env: Env, pred) -> None:
    """nnU-Net's evaluation of the prediction folder against labelsTs."""
    env.run("nnUNetv2_evaluate_folder", str(env.raw / "labelsTs"), str(pred), "-djfile", str(pred / "dataset.json"),
            "-pfile", str(pred / "plans.json"))
    summary = json.loads((pred / "summary.json").read_text())
    assert set(summary["mean"]) == {"1", "2"} and 0.0 <= summary["foreground_mean"]["Dice"] <= 1.0


def _calibrated(env: Env, pred) -> None:
    """``nnunet_ssl calibration`` on the saved probabilities: the ECE recomputed independently, foreground and
    class 1."""
    cases = sorted(p.name[: -len(".nii.gz")] for p in (env.raw / "labelsTs").iterdir())
    proc = env.run("nnunet_ssl", "calibration", "-ref", str(env.raw / "labelsTs"), "-pred", str(pred))
    assert "foreground" in proc.stdout
    result = json.loads((pred / "calibration.json").read_text())
    assert [c["case"] for c in result["metric_per_case"]] == cases
    for case in cases:  # the written segmentation is the probabilities' argmax
        probs = np.load(pred / f"{case}.npz")["probabilities"]
        assert np.array_equal(probs.argmax(0), read_image(pred / f"{case}.nii.gz"))
    ref = env.raw / "labelsTs"
    assert result["pooled"]["foreground"]["ECE"] == pytest.approx(
        folder_ece(pred, ref, cases, lambda r, p: (r != 0) | (p != 0)), rel=1e-4)
    assert result["pooled"]["classes"]["1"]["ECE"] == pytest.approx(
        folder_ece(pred, ref, cases, lambda r, p: (r == 1) | (p == 1)), rel=1e-4)
    assert (pred / "reliability_diagram.png").stat().st_size > 0


# trainer: (nnUNetv2_predict options, what is checked on its prediction folder)
PREDICTION = {"MuSTTrainer": (("-npp", "1", "-nps", "1"), _evaluated),  # with nnU-Net's worker processes
              "MisMatchTrainer": (("--save_probabilities",), _calibrated)}



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

    # the unlabeled images are preprocessed by two processes: the kill finds cases in flight
    workers = {"nnUNet_def_n_proc": "2"} if point == "preprocessing" else {}
    killed = env.run(sys.executable, INJECT, "kill", point, str(n), "--", *args, hparams=hp, check=False,
                     start_new_session=True, extra_env={**IN_PROCESS, **workers})
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

    if "augmentation" in extra:  # --c with another augmentation is refused before anything is written
        stamp = (out / "checkpoint_latest.pth").stat().st_mtime_ns
        refused = env.run("nnUNetv2_train", *args, "--c", hparams={"augmentation": "default"}, check=False,
                          extra_env=IN_PROCESS)
        assert refused.returncode != 0 and "augmentation" in refused.stderr
        assert (out / "checkpoint_latest.pth").stat().st_mtime_ns == stamp

    dump = tmp_path / "restored.pt"
    # with a checkpoint, --c runs without nnUNet_ssl_hparams: the checkpoint's hyper-parameters are used
    env.run(sys.executable, INJECT, "dump", str(dump), "--", *args, "--c", hparams=hp if saved is None else None,
            extra_env=IN_PROCESS)
    restored = torch.load(dump, weights_only=False)
    final = torch.load(out / "checkpoint_final.pth", weights_only=False)
    assert final["current_epoch"] == SCHEDULE["num_epochs"]
    assert not list(out.glob(".ckpt.*.tmp"))  # a temporary file left by the kill is gone
    for name, value in hp.items():  # the first run's hyper-parameters, in the checkpoint and ssl_hparams.json
        assert final["nnunet_ssl"]["hparams"][name] == value, name
    assert json.loads((out / "ssl_hparams.json").read_text())["hparams"] == final["nnunet_ssl"]["hparams"]
    if saved is None:  # killed before any checkpoint: a fresh start that finished the preprocessing
        assert restored["current_epoch"] == 0
        assert len(json.loads((unlabeled / "manifest.json").read_text())["cases"]) == 4
    else:  # what the resumed trainer holds is what the checkpoint held: weights, teacher, counters, rounds
        assert restored["current_epoch"] == saved["current_epoch"] >= 1
        assert restored["global_step"] == saved["current_epoch"] * SCHEDULE["num_iterations_per_epoch"]
        assert _equal(restored["network_weights"], saved["network_weights"])
        assert _equal(restored["nnunet_ssl"], saved["nnunet_ssl"])
        log = _resumed_log(out)
        assert f"Epoch {saved['current_epoch']}" in log and "Epoch 0" not in log
    for case, shape in restored["pseudo_label_shapes"].items():  # one channel, the preprocessed image's grid
        assert shape[0] == 1 and shape[1:] == blosc2.open(str(unlabeled / f"{case}.b2nd")).shape[1:], case
    METHOD_CHECKS.get(trainer, lambda *a: None)(out, saved, restored, final)
    for key in TRAINERS[trainer].extra_log_keys:  # one finite value per epoch, across the kill
        assert len(final["logging"][key]) == SCHEDULE["num_epochs"] and np.isfinite(final["logging"][key]).all()
    if trainer in RAMPED:  # the ramp went on from the restored iteration count
        h, n = final["nnunet_ssl"]["hparams"], SCHEDULE["num_iterations_per_epoch"]
        length = round(h["rampup_fraction"] * SCHEDULE["num_epochs"] * n)
        assert final["logging"]["consistency_weight"] == pytest.approx(
            [np.mean([h["consistency_weight"] * rampup(h["rampup"], e * n + i, length) for i in range(n)])
             for e in range(SCHEDULE["num_epochs"])])
    if issubclass(TRAINERS[trainer], SemiSupervisedTrainer):
        assert (unlabeled / "manifest.json").is_file()
    assert (out / "progress.png").stat().st_size > 0
    summary = json.loads((out / "validation" / "summary.json").read_text())  # nnU-Net's final validation ran
    assert set(summary["mean"]) == SUMMARY_CLASSES[fixture]

    pred = tmp_path / "pred"
    options, check_prediction = PREDICTION.get(trainer, ((), None))
    env.run("nnUNetv2_predict", "-i", str(env.raw / "imagesTs"), "-o", str(pred), "-d", str(env.dataset_id),
            "-c", configuration, "-tr", trainer, "-f", "0", "-device", "cpu", "--disable_tta", *options)
    assert sorted(p.name for p in pred.glob("*.nii.gz")) == \
        sorted(p.name.replace("_0000", "") for p in (env.raw / "imagesTs").iterdir())
    if check_prediction is not None:
        check_prediction(env, pred)


def test_every_trainer_is_covered():
    assert set(CASES) == set(TRAINERS)
    assert {c[0] for c in CASES.values()} == {"iteration", "checkpoint", "preprocessing", "pseudo_label"}
