"""Shared fixtures: tiny demo datasets planned and preprocessed once per session through nnU-Net's own CLI."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "examples"))

from make_demo_dataset import make_demo_dataset

from nnunet_ssl.ext_trainers_path import trainers_path

BIN = Path(sys.executable).parent
# nnU-Net's planner sizes torch's threads with nnUNet_n_proc_DA and fails when it is 0 (single-threaded debugging)
PLANNING_ENV = {"nnUNet_n_proc_DA": "2"}


@dataclass
class Env:
    """An nnU-Net environment (raw, preprocessed, results) with one dataset."""

    root: Path
    dataset_id: int
    name: str

    @property
    def vars(self) -> dict[str, str]:
        return {
            "nnUNet_raw": str(self.root / "raw"),
            "nnUNet_preprocessed": str(self.root / "pp"),
            "nnUNet_results": str(self.root / "results"),
            "nnUNet_extTrainer": str(trainers_path()),
            # nnU-Net's final validation starts this many export processes, each importing torch and nnU-Net: one
            # leaves the other core to the validation itself
            "nnUNet_def_n_proc": "1",
            "nnUNet_n_proc_DA": os.environ.get("nnUNet_n_proc_DA", "2"),
            "nnUNet_compile": "false",
            # nnUNetv2_predict in the calling process (nnU-Net's sequential mode): its default worker processes
            # cost about 14 s of start-up per call on 2 cores; MuST's interruption test keeps one of each
            "nnUNet_npp": "0",
            "nnUNet_nps": "0",
        }

    @property
    def raw(self) -> Path:
        return self.root / "raw" / self.name

    @property
    def pp(self) -> Path:
        return self.root / "pp" / self.name

    def results(self, trainer: str, configuration: str = "3d_fullres", fold: str = "0") -> Path:
        return self.root / "results" / self.name / f"{trainer}__nnUNetPlans__{configuration}" / f"fold_{fold}"

    def run(self, *cmd: str, hparams: dict | None = None, check: bool = True, extra_env: dict | None = None,
            **kw) -> subprocess.CompletedProcess:
        """Run one of nnU-Net's (or the plugin's) commands in this environment."""
        env = {**os.environ, **self.vars, **(extra_env or {})}
        env.pop("nnUNet_ssl_hparams", None)
        if hparams is not None:
            env["nnUNet_ssl_hparams"] = json.dumps(hparams)
        exe = str(BIN / cmd[0]) if (BIN / cmd[0]).exists() else cmd[0]
        proc = subprocess.run([exe, *cmd[1:]], check=False, env=env, capture_output=True, text=True, **kw)
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n"
                                 f"{proc.stderr[-4000:]}")
        return proc

    def copy(self, root: Path) -> Env:
        """A copy of raw and preprocessed data in another root (for tests that modify files)."""
        for sub in ("raw", "pp"):
            shutil.copytree(self.root / sub / self.name, root / sub / self.name)
        return Env(root, self.dataset_id, self.name)


def _planned(tmp_path_factory, dataset_id: int, configurations: tuple[str, ...], **kw) -> Env:
    root = tmp_path_factory.mktemp(f"nnunet_{dataset_id}")
    folder = make_demo_dataset(root / "raw", dataset_id=dataset_id, shape=(24, 24, 24), **kw)
    env = Env(root, dataset_id, folder.name)
    env.run("nnUNetv2_plan_and_preprocess", "-d", str(dataset_id), "-c", *configurations, "-np", "2",
            extra_env=PLANNING_ENV)
    return env


@pytest.fixture(scope="session")
def demo(tmp_path_factory) -> Env:
    """5 labeled (fold 0: 4 train, 1 val), 4 unlabeled, 2 test cases of 24^3; 2d and 3d_fullres planned."""
    return _planned(tmp_path_factory, 981, ("2d", "3d_fullres"), n_labeled=5, n_unlabeled=4, n_test=2)


@pytest.fixture(scope="session")
def demo_regions_ignore(tmp_path_factory) -> Env:
    """Region-based labels (organ = {1, 2}, lesion = {2}) with an ignore label (3) painted over a slab of every
    training label map, so that both nnU-Net features are exercised at once."""
    root = tmp_path_factory.mktemp("nnunet_982")
    folder = make_demo_dataset(root / "raw", dataset_id=982, shape=(24, 24, 24), n_labeled=5, n_unlabeled=3,
                               n_test=1, regions=True)
    dj_file = folder / "dataset.json"
    dj = json.loads(dj_file.read_text())
    dj["labels"]["ignore"] = 3
    dj_file.write_text(json.dumps(dj, indent=2))
    for f in sorted((folder / "labelsTr").iterdir()):
        img = sitk.ReadImage(str(f))
        arr = sitk.GetArrayFromImage(img)
        arr[:, :, :6] = 3  # unannotated slab
        out = sitk.GetImageFromArray(arr.astype(np.uint8))
        out.CopyInformation(img)
        sitk.WriteImage(out, str(f))
    env = Env(root, 982, folder.name)
    env.run("nnUNetv2_plan_and_preprocess", "-d", "982", "-c", "3d_fullres", "-np", "2", extra_env=PLANNING_ENV)
    return env


SHORT = {"num_epochs": 1, "num_iterations_per_epoch": 2, "num_val_iterations_per_epoch": 1}


# per trainer, what a run of a few iterations needs on top of SHORT
QUICK = {"POPCORNTrainer": {"num_epochs": 2}, "UGMCLTrainer": {"mc_passes": 2}, "UAMTTrainer": {"mc_passes": 2},
         # a pseudo-label refresh after the first iteration
         "LocalContrastiveTrainer": {"num_iterations_per_epoch": 4, "supervised_fraction": 0.25,
                                     "pseudo_label_rounds": 1, "refresh_every": 1}}


def ece_15_bins(conf: np.ndarray, correct: np.ndarray) -> float:
    """ECE with 15 equal-width confidence bins, written out independently of the package."""
    total = 0.0
    for m in range(15):
        inside = (conf > m / 15) & (conf <= (m + 1) / 15) if m else (conf <= 1 / 15)
        if inside.any():
            total += inside.sum() / conf.size * abs(correct[inside].mean() - conf[inside].mean())
    return total


def read_image(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def folder_ece(pred: Path, ref: Path, cases: list[str], select) -> float:
    """ECE (15 bins) of softmax probabilities saved as ``{pred}/{case}.npz`` against ``{ref}/{case}.nii.gz``,
    pooled over ``cases``, on the voxels where ``select(reference, argmax)`` is true; written out independently of
    the package."""
    conf, correct = [], []
    for case in cases:
        probs = np.load(pred / f"{case}.npz")["probabilities"].astype(np.float64)
        reference, seg = read_image(ref / f"{case}.nii.gz"), probs.argmax(0)
        keep = select(reference, seg)
        conf.append(probs.max(0)[keep])
        correct.append((seg == reference)[keep])
    return ece_15_bins(np.concatenate(conf), np.concatenate(correct))


def make_trainer(env: Env, name: str, monkeypatch, results: Path, hparams: dict | None = None,
                 configuration: str = "2d", trainer_cls: type | None = None):
    """An nnunet_ssl trainer (``trainer_cls``, by default the registry's ``name``) built in the test process (CPU,
    single-threaded loaders), writing into ``results``, with SHORT, QUICK and ``hparams``."""
    from nnunet_ssl.trainers import TRAINERS

    for k, v in {**env.vars, "nnUNet_results": str(results), "nnUNet_n_proc_DA": "0"}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("nnUNet_ssl_hparams", json.dumps({**SHORT, **QUICK.get(name, {}), **(hparams or {})}))
    plans = {**json.loads((env.pp / "nnUNetPlans.json").read_text()), "continue_training": False}
    dataset_json = json.loads((env.pp / "dataset.json").read_text())
    return (trainer_cls or TRAINERS[name])(plans, configuration, 0, dataset_json, torch.device("cpu"))


def first_losses(trainer, iterations: int) -> list[dict]:
    """Start ``trainer`` (checks, preprocessing, loaders) and run ``iterations`` training steps on its batches."""
    trainer.on_train_start()
    try:
        trainer.on_train_epoch_start()
        return [trainer.train_step(next(trainer.dataloader_train)) for _ in range(iterations)]
    finally:
        if hasattr(trainer, "shutdown_unlabeled_dataloader"):
            trainer.shutdown_unlabeled_dataloader()
