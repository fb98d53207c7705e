"""UGMCLTrainer and the mean-teacher family through nnU-Net's own commands: train, ``--c``, predict."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import SHORT

from nnunet_ssl.trainers import TRAINERS

pytestmark = pytest.mark.slow

CASES = {
    # trainer: (dataset fixture, configuration, extra hyper-parameters)
    "UGMCLTrainer": ("demo_regions_ignore", "3d_fullres", {"mc_passes": 2}),
    "MeanTeacherTrainer": ("demo", "3d_fullres", {"export_teacher": True}),
    "UAMTTrainer": ("demo", "3d_fullres", {"mc_passes": 2}),
    "DTCTrainer": ("demo", "2d", {}),
}


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("trainer", list(CASES))
def test_train_resume_predict(trainer, request, tmp_path):
    fixture, configuration, extra = CASES[trainer]
    env = request.getfixturevalue(fixture)
    hp = {**SHORT, **extra}
    train = ("nnUNetv2_train", str(env.dataset_id), configuration, "0", "-tr", trainer, "-device", "cpu")
    env.run(*train, hparams=hp)
    out = env.results(trainer, configuration)
    first = torch.load(out / "checkpoint_final.pth", weights_only=False)
    log = first["logging"]
    for key in TRAINERS[trainer].extra_log_keys:
        assert len(log[key]) == 1 and np.isfinite(log[key][0]), key
    assert json.loads((out / "validation" / "summary.json").read_text())["foreground_mean"]["Dice"] >= 0

    # --c resumes from the final checkpoint: everything (teacher included) is restored and written back unchanged
    env.run(*train, "--c", hparams=hp)
    again = torch.load(out / "checkpoint_final.pth", weights_only=False)
    assert again["current_epoch"] == 1
    assert _equal(again["network_weights"], first["network_weights"])
    if "teacher" in first["nnunet_ssl"]:
        assert _equal(again["nnunet_ssl"]["teacher"], first["nnunet_ssl"]["teacher"])
    if extra.get("export_teacher"):  # the predictor gets the teacher, --c kept the student apart
        assert _equal(first["network_weights"], first["nnunet_ssl"]["teacher"])
        assert _equal(again["nnunet_ssl"]["student_weights"], first["nnunet_ssl"]["student_weights"])
        assert not _equal(first["network_weights"], first["nnunet_ssl"]["student_weights"])

    pred = tmp_path / "pred"
    env.run("nnUNetv2_predict", "-i", str(env.raw / "imagesTs"), "-o", str(pred), "-d", str(env.dataset_id),
            "-c", configuration, "-tr", trainer, "-f", "0", "-device", "cpu", "--disable_tta")
    predicted = sorted(p.name for p in pred.glob("*.nii.gz"))
    assert predicted == sorted(p.name.replace("_0000", "") for p in (env.raw / "imagesTs").iterdir())
