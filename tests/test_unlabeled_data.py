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
import SimpleITK as sitk
from conftest import SHORT, make_demo_dataset
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from nnunet_ssl.data.loader import UnlabeledDataLoader, UnlabeledDataset
from nnunet_ssl.data.unlabeled import (
    UnlabeledDataError,
    check_unlabeled_cases,
    find_unlabeled_images,
    preprocess_unlabeled,
    unlabeled_preprocessed_folder,
)
from nnunet_ssl.trainers import TRAINERS
from nnunet_ssl.training.hparams import HParamError, resolve_hparams


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


def test_label_file_in_unlabeled_folder_is_named_as_such(raw):
    shutil.copy(raw / "labelsTr" / "demo_000.nii.gz", raw / "imagesUnlabeled" / "demo_000.nii.gz")
    with pytest.raises(UnlabeledDataError, match="name of a label file in .*labelsTr: label maps do not belong"):
        find_unlabeled_images(raw, _dj(raw))


def test_empty_unlabeled_folder_finds_nothing(raw):
    for f in (raw / "imagesUnlabeled").iterdir():
        f.unlink()
    assert find_unlabeled_images(raw, _dj(raw)) == {}  # the trainer then stops (test below)


def test_skip_bad_leaves_bad_files_and_cases_out(raw):
    folder = raw / "imagesUnlabeled"
    shutil.copy(folder / "demo_002_0000.nii.gz", folder / "demo_002_0001.nii.gz")  # extra channel: case is bad
    (folder / "notes.txt").write_text("x")  # wrong ending: file is ignored
    with pytest.raises(UnlabeledDataError, match="skip_bad_unlabeled"):  # the error says how to skip
        find_unlabeled_images(raw, _dj(raw))
    reports = []
    assert list(find_unlabeled_images(raw, _dj(raw), skip_bad=True, report=reports.append)) == ["demo_003"]
    assert len(reports) == 1 and "demo_002_0001.nii.gz" in reports[0] and "notes.txt" in reports[0]


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


def _write_image(path, array, spacing=(1.0, 1.0, 1.0), direction=None):
    img = sitk.GetImageFromArray(array.astype(np.float32))
    img.SetSpacing(spacing)
    if direction is not None:
        img.SetDirection(direction)
    sitk.WriteImage(img, str(path))
    return str(path)


def _random_image(shape=(16, 16, 16), seed=0):
    return np.random.default_rng(seed).normal(100, 20, shape)


@pytest.mark.parametrize("kind, message", [
    ("nan", "1 NaN and 0 infinite voxel(s)"),
    ("inf", "0 NaN and 3 infinite voxel(s)"),
    ("zeros", "the image is constant (0.0)"),
    ("truncated", "could not read or preprocess unlabeled case"),
])
def test_bad_voxels_fail_naming_the_file(demo, tmp_path, kind, message):
    pm, dj = _plans(demo)
    image = _random_image()
    if kind == "nan":
        image[1, 2, 3] = np.nan
    elif kind == "inf":
        image[0, 0, :3] = np.inf
    elif kind == "zeros":
        image[:] = 0
    f = _write_image(tmp_path / "bad_0000.nii.gz", image)
    if kind == "truncated":
        data = (tmp_path / "bad_0000.nii.gz").read_bytes()
        (tmp_path / "bad_0000.nii.gz").write_bytes(data[: len(data) // 2])
    out = tmp_path / "out"
    with pytest.raises(UnlabeledDataError) as e:
        preprocess_unlabeled({"bad": [f]}, out, pm, "3d_fullres", dj, 1, progress=False)
    assert f in str(e.value) and message in str(e.value) and "skip_bad_unlabeled" in str(e.value)
    assert [p.name for p in out.iterdir()] == []  # nothing half-written, no manifest entry
    assert check_unlabeled_cases({"bad": [f]}, pm, 1)[0].startswith(f)  # the CLI's --check-only finds it too


@pytest.mark.parametrize("what", ["spacing", "orientation", "size"])
def test_channels_on_different_grids_fail_naming_the_file(tmp_path, what):
    t1 = _write_image(tmp_path / "c_0000.nii.gz", _random_image())
    flipped = (-1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
    t2 = _write_image(tmp_path / "c_0001.nii.gz", _random_image((16, 16, 12) if what == "size" else (16, 16, 16)),
                      spacing=(1.0, 1.0, 2.0) if what == "spacing" else (1.0, 1.0, 1.0),
                      direction=flipped if what == "orientation" else None)
    from nnunet_ssl.data.unlabeled import check_channel_geometry

    with pytest.raises(UnlabeledDataError, match=f"c_0001.nii.gz: {what} .* differs from .*c_0000.nii.gz"):
        check_channel_geometry("c", [t1, t2])
    check_channel_geometry("c", [t1, t1])  # the same grid passes


def test_skip_bad_preprocesses_the_good_cases_and_lists_the_bad(demo, tmp_path):
    pm, dj = _plans(demo)
    good = _write_image(tmp_path / "good_0000.nii.gz", _random_image())
    nan = _random_image(seed=1)
    nan[0, 0, 0] = np.nan
    bad = _write_image(tmp_path / "bad_0000.nii.gz", nan)
    reports = []
    out = tmp_path / "out"
    ready = preprocess_unlabeled({"good": [good], "bad": [bad]}, out, pm, "3d_fullres", dj, 2, progress=False,
                                 skip_bad=True, report=reports.append)
    assert ready == ["good"]
    assert len(reports) == 1 and bad in reports[0] and "1 NaN" in reports[0]
    assert sorted(json.loads((out / "manifest.json").read_text())["cases"]) == ["good"]  # bad is retried next time


def test_image_smaller_than_the_patch_is_padded(demo, tmp_path):
    """As for nnU-Net's labeled cases: preprocessing keeps the small image, the loader pads the patch."""
    pm, dj = _plans(demo)
    small = _write_image(tmp_path / "small_0000.nii.gz", _random_image((5, 6, 7)))
    out = tmp_path / "out"
    preprocess_unlabeled({"small": [small]}, out, pm, "3d_fullres", dj, 1, progress=False)
    patch = pm.get_configuration("3d_fullres").patch_size
    assert blosc2.open(str(out / "small.b2nd"), mode="r").shape == (1, 5, 6, 7)
    loader = UnlabeledDataLoader(UnlabeledDataset(str(out), ["small"]), 2, patch, patch,
                                 pm.get_label_manager(dj))
    batch = next(loader)
    assert batch["data"].shape == (2, 1, *patch)
    assert (batch["data"] != 0).sum() <= 2 * 5 * 6 * 7  # the rest is padding


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
    """Through nnU-Net's command line: the error, before the unlabeled images are preprocessed. A bad value fails the
    same check (resolve_hparams, called by the trainer's __init__)."""
    copy = demo.copy(tmp_path)
    shutil.rmtree(unlabeled_preprocessed_folder(copy.pp, "nnUNetPlans_3d_fullres"), ignore_errors=True)
    proc = copy.run("nnUNetv2_train", str(copy.dataset_id), "3d_fullres", "0", "-tr", "MuSTTrainer", "-device",
                    "cpu", hparams={"temprature": 0.5}, check=False)
    assert proc.returncode != 0 and "unknown hyper-parameter(s) for MuSTTrainer: temprature" in proc.stderr
    assert HParamError.__name__ in proc.stderr
    assert not unlabeled_preprocessed_folder(copy.pp, "nnUNetPlans_3d_fullres").exists()
    with pytest.raises(HParamError, match="'temperature' = 'hot' is invalid: expected a number"):
        resolve_hparams(TRAINERS["MuSTTrainer"].hparam_spec, "MuSTTrainer", {"temperature": "hot"})


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
