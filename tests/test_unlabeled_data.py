"""The unlabeled pipeline: checks of every bad input, byte-identical preprocessing, staleness, atomic writes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import blosc2
import numpy as np
import pytest
from conftest import SHORT, make_demo_dataset
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from nnunet_ssl.data.unlabeled import (
    UnlabeledDataError,
    find_unlabeled_images,
    preprocess_unlabeled,
    unlabeled_preprocessed_folder,
)
from nnunet_ssl.training.hparams import HParamError


@pytest.fixture
def raw(tmp_path):
    return make_demo_dataset(tmp_path / "raw", dataset_id=983, n_labeled=2, n_unlabeled=2, n_test=0,
                             shape=(16, 16, 16))


def _dj(raw):
    return json.loads((raw / "dataset.json").read_text())


def test_finds_unlabeled_cases(raw):
    cases = find_unlabeled_images(raw, _dj(raw))
    assert list(cases) == ["demo_002", "demo_003"]
    assert cases["demo_002"] == [str(raw / "imagesUnlabeled" / "demo_002_0000.nii.gz")]
    shutil.rmtree(raw / "imagesUnlabeled")
    assert find_unlabeled_images(raw, _dj(raw)) == {}


@pytest.mark.parametrize("name, message", [
    ("demo_009_0000.nii", "wrong file ending"),
    ("demo_009.nii.gz", "name must be {case}_{channel:04d}.nii.gz"),
    ("demo_002_0001.nii.gz", "channel 0001, but the dataset has 1 channel"),
    ("demo_000_0000.nii.gz", "case 'demo_000' is also a labeled case in imagesTr"),
])
def test_bad_file_names_are_reported_with_the_file(raw, name, message):
    shutil.copy(raw / "imagesUnlabeled" / "demo_002_0000.nii.gz", raw / "imagesUnlabeled" / name)
    with pytest.raises(UnlabeledDataError) as e:
        find_unlabeled_images(raw, _dj(raw))
    assert message in str(e.value)
    assert str(raw / "imagesUnlabeled" / name) in str(e.value)


def test_missing_channel_is_reported(raw):
    dj = _dj(raw)
    dj["channel_names"] = {"0": "T1", "1": "T2"}
    with pytest.raises(UnlabeledDataError, match=r"demo_002_0001.nii.gz: missing; case 'demo_002' needs all 2"):
        find_unlabeled_images(raw, dj)


def test_folder_inside_is_reported(raw):
    (raw / "imagesUnlabeled" / "sub").mkdir()
    with pytest.raises(UnlabeledDataError, match="sub: is a folder"):
        find_unlabeled_images(raw, _dj(raw))


def _plans(demo):
    return PlansManager(str(demo.pp / "nnUNetPlans.json")), json.loads((demo.pp / "dataset.json").read_text())


@pytest.mark.parametrize("configuration", ["3d_fullres", "2d"])
def test_preprocessed_arrays_identical_to_nnunet(demo, tmp_path, configuration):
    pm, dj = _plans(demo)
    case_images = [str(demo.raw / "imagesTr" / "demo_000_0000.nii.gz")]
    out = tmp_path / "out"
    assert preprocess_unlabeled({"copy_of_000": case_images}, out, pm, configuration, dj, 1, progress=False) \
        == ["copy_of_000"]
    ours = blosc2.open(str(out / "copy_of_000.b2nd"), mode="r")[:]
    nnunet_dir = demo.pp / pm.get_configuration(configuration).data_identifier
    theirs = blosc2.open(str(nnunet_dir / "demo_000.b2nd"), mode="r")[:]
    assert ours.dtype == theirs.dtype and ours.shape == theirs.shape
    assert np.array_equal(ours, theirs)


def test_only_missing_or_stale_cases_are_redone(demo, tmp_path):
    pm, dj = _plans(demo)
    src = tmp_path / "src"
    src.mkdir()
    for case in ("demo_005", "demo_006"):
        shutil.copy(demo.raw / "imagesUnlabeled" / f"{case}_0000.nii.gz", src / f"{case}_0000.nii.gz")
    cases = {c: [str(src / f"{c}_0000.nii.gz")] for c in ("demo_005", "demo_006")}
    out = tmp_path / "out"
    preprocess_unlabeled(cases, out, pm, "3d_fullres", dj, 2, progress=False)
    stamp = {c: (out / f"{c}.b2nd").stat().st_mtime_ns for c in cases}
    preprocess_unlabeled(cases, out, pm, "3d_fullres", dj, 2, progress=False)
    assert {c: (out / f"{c}.b2nd").stat().st_mtime_ns for c in cases} == stamp  # nothing redone
    # a changed image (new content, new mtime) is redone, the other is not
    shutil.copy(demo.raw / "imagesTr" / "demo_000_0000.nii.gz", src / "demo_006_0000.nii.gz")
    os.utime(src / "demo_006_0000.nii.gz", ns=(1, 1))
    preprocess_unlabeled(cases, out, pm, "3d_fullres", dj, 2, progress=False)
    assert (out / "demo_005.b2nd").stat().st_mtime_ns == stamp["demo_005"]
    assert (out / "demo_006.b2nd").stat().st_mtime_ns != stamp["demo_006"]
    # a deleted output is redone
    (out / "demo_005.pkl").unlink()
    preprocess_unlabeled(cases, out, pm, "3d_fullres", dj, 2, progress=False)
    assert (out / "demo_005.pkl").exists()
    assert sorted(json.loads((out / "manifest.json").read_text())["cases"]) == ["demo_005", "demo_006"]


def test_unreadable_image_fails_naming_the_file_and_writes_nothing(demo, tmp_path):
    pm, dj = _plans(demo)
    bad = tmp_path / "broken_0000.nii.gz"
    bad.write_bytes(b"this is not a NIfTI file")
    out = tmp_path / "out"
    with pytest.raises(UnlabeledDataError) as e:
        preprocess_unlabeled({"broken": [str(bad)]}, out, pm, "3d_fullres", dj, 1, progress=False)
    assert str(bad) in str(e.value) and "could not read" in str(e.value)
    assert [p.name for p in out.iterdir()] == []  # no partial case, no temporary folder, no manifest entry


def test_trainer_without_unlabeled_images_fails_before_training(demo, tmp_path, monkeypatch):
    copy = demo.copy(tmp_path)
    shutil.rmtree(copy.raw / "imagesUnlabeled")
    proc = copy.run("nnUNetv2_train", str(copy.dataset_id), "3d_fullres", "0", "-tr", "MuSTTrainer", "-device",
                    "cpu", hparams=SHORT, check=False)
    assert proc.returncode != 0
    assert "MuSTTrainer needs unlabeled images but found none" in proc.stderr
    assert str(copy.raw / "imagesUnlabeled") in proc.stderr
    assert not (copy.results("MuSTTrainer") / "checkpoint_final.pth").exists()
    assert not list(copy.results("MuSTTrainer").glob("progress.png"))  # no epoch ran


def test_bad_hyper_parameters_fail_before_training(demo, tmp_path):
    copy = demo.copy(tmp_path)
    shutil.rmtree(unlabeled_preprocessed_folder(copy.pp, "nnUNetPlans_3d_fullres"), ignore_errors=True)
    for hparams, message in (({"temprature": 0.5}, "unknown hyper-parameter(s) for MuSTTrainer: temprature"),
                             ({"temperature": "hot"}, "'temperature' = 'hot' is invalid: expected a number")):
        proc = copy.run("nnUNetv2_train", str(copy.dataset_id), "3d_fullres", "0", "-tr", "MuSTTrainer", "-device",
                        "cpu", hparams=hparams, check=False)
        assert proc.returncode != 0 and message in proc.stderr
        assert HParamError.__name__ in proc.stderr
    assert not unlabeled_preprocessed_folder(copy.pp, "nnUNetPlans_3d_fullres").exists()


def test_cli_check_and_preprocess(demo, tmp_path):
    copy = demo.copy(tmp_path)
    proc = copy.run("nnunet_ssl", "preprocess-unlabeled", "-d", str(copy.dataset_id), "--check-only")
    assert "4 unlabeled case(s) passed the checks" in proc.stdout
    copy.run("nnunet_ssl", "preprocess-unlabeled", "-d", str(copy.dataset_id), "-c", "3d_fullres", "2d")
    for ident in ("nnUNetPlans_3d_fullres", "nnUNetPlans_2d"):
        folder = unlabeled_preprocessed_folder(copy.pp, ident)
        assert sorted(p.name for p in folder.glob("*.b2nd") if "_seg" not in p.name) == \
            [f"demo_00{i}.b2nd" for i in range(5, 9)]
    (copy.raw / "imagesUnlabeled" / "demo_005_0000.nii.gz").rename(copy.raw / "imagesUnlabeled" / "x.nii")
    proc = copy.run("nnunet_ssl", "preprocess-unlabeled", "-d", str(copy.dataset_id), "--check-only", check=False)
    assert proc.returncode != 0 and "x.nii: wrong file ending" in proc.stderr


def test_cli_says_how_to_set_ext_trainer(demo):
    env = {k: v for k, v in {**os.environ, **demo.vars}.items() if k != "nnUNet_extTrainer"}
    proc = subprocess.run([sys.executable, "-m", "nnunet_ssl.cli", "hparams", "MuSTTrainer"], check=False, env=env,
                          capture_output=True, text=True)
    assert proc.returncode == 0 and "temperature" in proc.stdout
    assert 'export nnUNet_extTrainer="$(nnunet_ssl trainers-path)"' in proc.stderr
