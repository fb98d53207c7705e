"""Labeled-fraction experiments: the declaration file, and proof that declared cases' labels are never read."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import SHORT

from nnunet_ssl.data.labeled_fraction import (
    FILENAME,
    check_declared_cases,
    declared_unlabeled_cases,
    make_labeled_fraction,
)
from nnunet_ssl.data.unlabeled import UnlabeledDataError

CASES = [f"c{i:02d}" for i in range(10)]


def test_make_labeled_fraction_per_fold(tmp_path):
    result = make_labeled_fraction(tmp_path, CASES, fraction=0.25, seed=3)
    splits = json.loads((tmp_path / "splits_final.json").read_text())  # nnU-Net's default 5-fold split
    assert len(splits) == 5 and json.loads((tmp_path / FILENAME).read_text()) == result
    for fold, split in enumerate(splits):
        declared = result[str(fold)]
        assert set(declared) < set(split["train"]) and not set(declared) & set(split["val"])
        assert len(split["train"]) - len(declared) == 2  # round(0.25 * 8)
        assert declared_unlabeled_cases(tmp_path, fold) == declared
    assert make_labeled_fraction(tmp_path, CASES, fraction=0.25, seed=3) == result  # reproducible
    assert make_labeled_fraction(tmp_path, CASES, num_labeled=1, seed=3)["0"] != result["0"]
    with pytest.raises(ValueError, match="fraction must lie in"):
        make_labeled_fraction(tmp_path, CASES, fraction=1.5)


def test_declaration_file_format_and_checks(tmp_path):
    (tmp_path / FILENAME).write_text(json.dumps({"all": ["c01"], "1": ["c02", "c03"]}))
    assert declared_unlabeled_cases(tmp_path, 0) == ["c01"]
    assert declared_unlabeled_cases(tmp_path, 1) == ["c02", "c03"]
    assert declared_unlabeled_cases(tmp_path, None) == ["c01", "c02", "c03"]
    (tmp_path / FILENAME).write_text(json.dumps(["c01"]))
    with pytest.raises(UnlabeledDataError, match="expected an object mapping a fold"):
        declared_unlabeled_cases(tmp_path, 0)
    with pytest.raises(UnlabeledDataError, match="'c09' is a validation case of fold 0"):
        check_declared_cases(["c09"], ["c01", "c02"], ["c09"], 0, tmp_path / FILENAME)
    with pytest.raises(UnlabeledDataError, match="'zz' is not a training case of fold 0"):
        check_declared_cases(["zz"], ["c01", "c02"], ["c09"], 0, tmp_path / FILENAME)
    with pytest.raises(UnlabeledDataError, match="keep at least one labeled"):
        check_declared_cases(["c01", "c02"], ["c01", "c02"], ["c09"], 0, tmp_path / FILENAME)


@pytest.mark.slow
def test_declared_labels_are_never_read(demo, tmp_path):
    """Every label-derived file of the declared cases is deleted before training; training, resume-free final
    validation and the supervised baseline still run, so nothing of them was read."""
    env = demo.copy(tmp_path)
    proc = env.run("nnunet_ssl", "labeled-fraction", "-d", str(env.dataset_id), "--num-labeled", "2", "--folds", "0")
    assert "fold 0: 2 training case(s) declared unlabeled" in proc.stdout
    declared = json.loads((env.pp / FILENAME).read_text())["0"]
    assert len(declared) == 2
    for case in declared:
        (env.raw / "labelsTr" / f"{case}.nii.gz").unlink()
        (env.pp / "gt_segmentations" / f"{case}.nii.gz").unlink()
        for suffix in ("_seg.b2nd", ".pkl"):  # label array and label-derived class locations
            (env.pp / "nnUNetPlans_3d_fullres" / f"{case}{suffix}").unlink()
    for trainer in ("MuSTTrainer", "SupervisedTrainer"):
        env.run("nnUNetv2_train", str(env.dataset_id), "3d_fullres", "0", "-tr", trainer, "-device", "cpu",
                hparams=SHORT)
        log = next(env.results(trainer).glob("training_log_*.txt")).read_text()
        assert f"2 training case(s) declared unlabeled in {FILENAME}; 2 labeled training case(s) remain" in log
        assert torch.load(env.results(trainer) / "checkpoint_final.pth", weights_only=False)["current_epoch"] == 1
    # the declared cases' images were preprocessed as unlabeled cases (images only, from imagesTr)
    unlabeled = env.pp / "nnUNetPlans_3d_fullres_unlabeled"
    assert {c for c in declared} <= {p.name[:-5] for p in unlabeled.glob("*.b2nd") if "_seg" not in p.name}
