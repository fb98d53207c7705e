"""The cohort builder: determinism, exact labels, layout; fetching source anatomies (offline checks only)."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from nnunet_ssl.evaluation import anatomy as anatomy_mod
from nnunet_ssl.evaluation import cohort as cohort_module
from nnunet_ssl.evaluation.anatomy import Anatomy, AnatomyError, fetch_wheel, load_anatomy
from nnunet_ssl.evaluation.cohort import CohortBuilder, CohortConfig


def _phantom(name: str, radius: float, label_values=(0, 1, 2)) -> Anatomy:
    """A 1 mm 'brain': an ellipsoid of grey matter around a white-matter core, with texture."""
    shape = (60, 70, 60)
    idx = np.indices(shape).astype(np.float32)
    centre = (np.asarray(shape) - 1)[:, None, None, None] / 2
    r = np.sqrt((((idx - centre) / np.array([1.0, 1.2, 1.0])[:, None, None, None]) ** 2).sum(0))
    brain, core = r < radius, r < radius * 0.6
    labels = np.full(shape, label_values[0], np.uint8)
    labels[brain] = label_values[1]
    labels[core] = label_values[2]
    rng = np.random.default_rng(7)
    image = np.where(core, 1.0, np.where(brain, 0.7, 0.0)).astype(np.float32)
    image = image * (1 + 0.05 * rng.normal(size=shape)).astype(np.float32)
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    affine[:3, 3] = -centre[:, 0, 0, 0]
    return Anatomy(name, image, labels, affine, np.zeros(3), np.array([2 * radius, 2.4 * radius, 2 * radius]))


def _config(seed=0, **kw) -> CohortConfig:
    base = {"dataset_id": 951, "name": "Phantom", "seed": seed, "spacing": 4.0, "num_narrow": 2, "num_wide": 3,
            "num_val": 1, "num_test": 2, "num_extra_unlabeled": 1, "sources": ("a", "b"), "narrow_source": "a",
            "margin_mm": 4.0}
    base.update(kw)
    return CohortConfig(**base)


ANATOMIES = {"a": _phantom("a", 22.0), "b": _phantom("b", 18.0)}


def _read(path: Path) -> tuple[np.ndarray, tuple]:
    img = sitk.ReadImage(str(path))
    return sitk.GetArrayFromImage(img), img.GetSpacing()


def test_same_seed_same_files_other_seed_other_files(tmp_path):
    folders = [CohortBuilder(_config(seed), tmp_path, ANATOMIES).build(tmp_path / f"raw{i}", progress=lambda _: None)
               for i, seed in enumerate((0, 0, 1))]
    files = sorted(p.relative_to(folders[0]) for p in folders[0].rglob("*") if p.is_file())
    assert Path("imagesTr/narrow_000_0000.nii.gz") in files and Path("labelsTs/test_001.nii.gz") in files
    assert Path("imagesUnlabeled/extra_000_0000.nii.gz") in files
    assert len([f for f in files if f.parts[0] == "imagesTr"]) == 6  # 2 narrow + 3 wide + 1 validation
    for f in files:
        assert (folders[0] / f).read_bytes() == (folders[1] / f).read_bytes(), f
    differs = [f for f in files if f.suffix == ".gz" and (folders[0] / f).read_bytes() != (folders[2] / f).read_bytes()]
    assert len(differs) == len([f for f in files if f.suffix == ".gz"])
    cohort = json.loads((folders[0] / "cohort.json").read_text())
    assert cohort["labeled_pool"] == ["narrow_000", "narrow_001"] and cohort["validation"] == ["val_000"]
    assert {s["source"] for s in cohort["subjects"] if s["pool"] == "narrow"} == {"a"}
    assert {s["source"] for s in cohort["subjects"] if s["pool"] == "wide"} == {"a", "b"}
    dj = json.loads((folders[0] / "dataset.json").read_text())
    assert dj["numTraining"] == 6 and dj["labels"] == {"background": 0, "grey_matter": 1, "white_matter": 2}


def test_labels_are_exact_source_values(tmp_path):
    # a source whose label map holds only 0 and 2: any interpolation of label values would create 1 at the
    # boundary; nearest-neighbour warping of the label map cannot
    src = {"a": _phantom("a", 22.0, label_values=(0, 0, 2)), "b": _phantom("b", 18.0, label_values=(0, 0, 2))}
    cfg = _config(spacing=3.0)
    cfg.wide = type(cfg.wide)(**{**cfg.wide.__dict__, "thick_slice_probability": 1.0})  # anisotropic subjects too
    builder = CohortBuilder(cfg, tmp_path, src)
    for pool, i in (("narrow", 0), ("wide", 1), ("test", 0)):
        record, image, labels = builder.subject(pool, i)
        assert set(np.unique(labels)) == {0, 2}
        assert labels.shape == image.shape == tuple(record.shape)
        # the image moved with the labels: the core is brighter than the rest on average
        assert image[labels == 2].mean() > 1.2 * image[labels == 0].mean()
    assert max(builder.subject("wide", 1)[0].spacing) > 3.0  # thick slices drawn


def test_written_geometry_and_labels(tmp_path):
    folder = CohortBuilder(_config(), tmp_path, ANATOMIES).build(tmp_path / "raw", progress=lambda _: None)
    cohort = json.loads((folder / "cohort.json").read_text())
    for s in cohort["subjects"]:
        if s["pool"] == "extra":
            continue
        labels_dir = "labelsTs" if s["pool"] == "test" else "labelsTr"
        lab, spacing = _read(folder / labels_dir / f"{s['case']}.nii.gz")
        img, spacing_img = _read(folder / ("imagesTs" if s["pool"] == "test" else "imagesTr") /
                                 f"{s['case']}_0000.nii.gz")
        assert spacing == spacing_img == pytest.approx(tuple(s["spacing"]))
        assert lab.shape == img.shape == tuple(reversed(s["shape"]))
        assert set(np.unique(lab)) <= {0, 1, 2} and lab.dtype == np.uint8
    with pytest.raises(FileExistsError, match="--overwrite"):
        CohortBuilder(_config(), tmp_path, ANATOMIES).build(tmp_path / "raw", progress=lambda _: None)


def test_bad_settings():
    with pytest.raises(ValueError, match="unknown source 'nope'"):
        CohortConfig(sources=("mni152", "nope")).check()
    with pytest.raises(ValueError, match="at least 2"):
        CohortConfig(num_narrow=1).check()
    with pytest.raises(ValueError, match="num_wide 2: without a narrow pool"):
        CohortConfig(num_narrow=0, num_wide=2).check()


def test_without_a_narrow_pool_the_labeled_cases_come_from_the_wide_subjects(tmp_path):
    folder = CohortBuilder(_config(num_narrow=0), tmp_path, ANATOMIES).build(tmp_path / "raw", progress=lambda _: None)
    cohort = json.loads((folder / "cohort.json").read_text())
    assert cohort["pools"]["narrow"] == [] and cohort["labeled_pool"] == ["wide_000", "wide_001", "wide_002"]
    assert json.loads((folder / "dataset.json").read_text())["numTraining"] == 4  # 3 wide + 1 validation


def test_the_narrow_source_is_loaded_only_for_a_narrow_pool(tmp_path, monkeypatch):
    loaded = []
    monkeypatch.setattr(cohort_module, "load_anatomy", lambda name, cache: loaded.append(name) or ANATOMIES["b"])
    for num_narrow in (2, 0):
        loaded.clear()
        CohortBuilder(CohortConfig(num_narrow=num_narrow, sources=("fsaverage",), narrow_source="mni152"), tmp_path)
        assert loaded == (["fsaverage", "mni152"] if num_narrow else ["fsaverage"])


def test_missing_package_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # as on a machine without the registry
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "nothing"))
    with pytest.raises(AnatomyError, match=r"(?s)nilearn==0\.14\.1.*could not be fetched.*pip download --no-deps"):
        fetch_wheel("mni152", tmp_path / "cache")
    with pytest.raises(AnatomyError, match="unknown source"):
        fetch_wheel("colin27", tmp_path)


def test_wheel_in_cache_is_read_and_checked(tmp_path, monkeypatch):
    # a wheel already in the cache is used without the registry; its files are checked against the pinned sums
    member = "pkg/t1.nii.gz"
    img = sitk.GetImageFromArray(np.zeros((4, 4, 4), np.float32))
    sitk.WriteImage(img, str(tmp_path / "t1.nii.gz"))
    data = (tmp_path / "t1.nii.gz").read_bytes()
    pkg = anatomy_mod.SourcePackage("fake==1.0", "fake-1.0-", None, "test", {member: "0" * 64})
    monkeypatch.setitem(anatomy_mod.SOURCES, "fake", pkg)
    with zipfile.ZipFile(tmp_path / "fake-1.0-py3-none-any.whl", "w") as z:
        z.writestr(member, data)
    assert fetch_wheel("fake", tmp_path) == tmp_path / "fake-1.0-py3-none-any.whl"
    with pytest.raises(AnatomyError, match="expected SHA-256"):
        anatomy_mod._read_member(tmp_path / "fake-1.0-py3-none-any.whl", member, "0" * 64)


@pytest.mark.slow
def test_real_mni152_source(tmp_path):
    # fetches the pinned nilearn wheel (11 MB) from the package registry, as make-cohort does
    a = load_anatomy("mni152", tmp_path)
    assert a.image.shape == a.labels.shape == (197, 233, 189)
    assert set(np.unique(a.labels)) == {0, 1, 2}
    assert np.median(a.image[a.labels == 2]) == pytest.approx(1.0)
    assert np.median(a.image[a.labels == 1]) < 0.9  # grey matter darker than white matter on T1
    assert any(tmp_path.glob("nilearn-0.14.1-*.whl"))


def test_t2_like_contrast_inverts_grey_and_white(tmp_path):
    from dataclasses import replace

    cfg = _config(spacing=3.0)
    cfg.wide = replace(cfg.wide, t2_like_probability=1.0, bias=0.0, noise=(0.0, 0.0))
    _, image, labels = CohortBuilder(cfg, tmp_path, ANATOMIES).subject("wide", 0)
    assert image[labels == 2].mean() < image[labels == 1].mean()  # white matter darker than grey matter
    _, image_narrow, labels_narrow = CohortBuilder(cfg, tmp_path, ANATOMIES).subject("narrow", 0)
    assert image_narrow[labels_narrow == 2].mean() > image_narrow[labels_narrow == 1].mean()  # narrow: T1
