"""Unlabeled images: find and check ``imagesUnlabeled/``, preprocess them with nnU-Net's own preprocessor.

Layout (the user-facing contract, see the README):

- raw: ``nnUNet_raw/DatasetXXX_Name/imagesUnlabeled/{case}_{channel:04d}{file_ending}``, named like ``imagesTr``;
- preprocessed: ``nnUNet_preprocessed/DatasetXXX_Name/{data_identifier}_unlabeled/``, a *sibling* of the
  configuration's folder, never inside it (nnU-Net treats every file there as a labeled case and
  ``nnUNetv2_preprocess`` deletes that folder).

Each case is written by ``run_case_save`` of the configuration's preprocessor class (byte-identical image
arrays to nnU-Net's own preprocessing) into a temporary folder and renamed into place, so an interrupted
run never leaves a half-written case. ``manifest.json`` records the plans fingerprint and each source
file's size and modification time; a case is redone when it is new, changed or its output is missing.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import re
import shutil
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from pathlib import Path

from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
from nnunetv2.utilities.utils import (
    get_filenames_of_train_images_and_targets,
    get_identifiers_from_splitted_dataset_folder,
)
from tqdm import tqdm

UNLABELED_FOLDER = "imagesUnlabeled"
MANIFEST = "manifest.json"
OUTPUT_SUFFIXES = (".b2nd", "_seg.b2nd", ".pkl")


SKIP_BAD_HINT = ('nnUNet_ssl_hparams=\'{"skip_bad_unlabeled": true}\' for training or --skip-bad for '
                 '`nnunet_ssl preprocess-unlabeled`')
# endings SimpleITK reads: their headers give each channel's geometry without loading the voxels
SITK_ENDINGS = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd", ".gipl", ".gipl.gz")


class UnlabeledDataError(ValueError):
    """Bad unlabeled input; the message names the file or case and says how to fix it."""


def unlabeled_preprocessed_folder(preprocessed_dataset_folder_base: str | Path, data_identifier: str) -> Path:
    return Path(preprocessed_dataset_folder_base) / f"{data_identifier}_unlabeled"


def num_channels(dataset_json: dict) -> int:
    return len(dataset_json["channel_names"] if "channel_names" in dataset_json else dataset_json["modality"])


def labeled_case_ids(raw_dataset_folder: str | Path, dataset_json: dict) -> list[str]:
    """The training cases of ``imagesTr`` (or of dataset.json's ``dataset`` key), as nnU-Net lists them."""
    if "dataset" in dataset_json:
        return sorted(dataset_json["dataset"])
    return sorted(get_identifiers_from_splitted_dataset_folder(str(Path(raw_dataset_folder) / "imagesTr"),
                                                               dataset_json["file_ending"]))


def find_unlabeled_images(raw_dataset_folder: str | Path, dataset_json: dict, skip_bad: bool = False,
                          report: Callable[[str], None] = print) -> dict[str, list[str]]:
    """Map case id -> channel files of ``imagesUnlabeled/`` after checking names, endings, channels and overlap
    with the labeled cases. All problems are collected and raised together, each naming its file; with
    ``skip_bad`` the offending files and cases are left out instead and ``report`` gets the list."""
    folder = Path(raw_dataset_folder) / UNLABELED_FOLDER
    if not folder.is_dir():
        return {}
    ending = dataset_json["file_ending"]
    n_ch = num_channels(dataset_json)
    pattern = re.compile(r"(?P<case>.+)_(?P<ch>\d{4})" + re.escape(ending))
    example = f"case_001_0000{ending}"
    labels_folder = Path(raw_dataset_folder) / "labelsTr"
    problems: list[str] = []
    bad_cases: set[str] = set()
    cases: dict[str, dict[int, str]] = defaultdict(dict)
    for path in sorted(folder.iterdir()):
        if path.name.startswith("."):
            continue
        if path.is_dir():
            problems.append(f"{path}: is a folder; {UNLABELED_FOLDER}/ holds image files only. Move it out.")
            continue
        if not path.name.endswith(ending):
            problems.append(
                f"{path}: wrong file ending; this dataset's images end in '{ending}' (dataset.json 'file_ending'). "
                f"Convert the image to {ending} or remove it."
            )
            continue
        m = pattern.fullmatch(path.name)
        if m is None:
            hint = (f" It has the name of a label file in {labels_folder}: label maps do not belong in "
                    f"{UNLABELED_FOLDER}/ (images only); move it out." if (labels_folder / path.name).is_file() else
                    " If it is a label map, it does not belong here: move it out.")
            problems.append(
                f"{path}: name must be {{case}}_{{channel:04d}}{ending} like imagesTr (e.g. {example}).{hint}"
            )
            continue
        ch = int(m["ch"])
        if ch >= n_ch:
            problems.append(
                f"{path}: channel {ch:04d}, but the dataset has {n_ch} channel(s) (_0000 to _{n_ch - 1:04d}, "
                f"dataset.json 'channel_names'). Remove it or fix the channel index."
            )
            bad_cases.add(m["case"])
            continue
        cases[m["case"]][ch] = str(path)
    for case, chans in sorted(cases.items()):
        missing = [f"{case}_{c:04d}{ending}" for c in range(n_ch) if c not in chans]
        if missing:
            problems.append(
                f"{folder / missing[0]}: missing; case '{case}' needs all {n_ch} channel(s), lacking "
                f"{', '.join(missing)}. Add the missing channel file(s) or remove the case."
            )
            bad_cases.add(case)
    overlap = sorted(set(cases) & set(labeled_case_ids(raw_dataset_folder, dataset_json)))
    for case in overlap:
        problems.append(
            f"{folder / (case + '_0000' + ending)}: case '{case}' is also a labeled case in imagesTr. A case is "
            f"either labeled or unlabeled: rename or remove it here (to treat labeled cases as unlabeled, use the "
            f"labeled-fraction file instead)."
        )
        bad_cases.add(case)
    if problems:
        message = f"{len(problems)} problem(s) with the unlabeled images:\n  " + "\n  ".join(problems)
        if not skip_bad:
            raise UnlabeledDataError(message + f"\n(To leave bad unlabeled cases out instead of stopping, set "
                                               f"{SKIP_BAD_HINT}.)")
        report(f"WARNING: left out (skip_bad_unlabeled): {message}")
    return {case: [chans[c] for c in range(n_ch)] for case, chans in sorted(cases.items()) if case not in bad_cases}


def gather_unlabeled_cases(raw_dataset_folder: str | Path, dataset_json: dict, declared: Iterable[str] = (),
                           skip_bad: bool = False, report: Callable[[str], None] = print) -> dict[str, list[str]]:
    """Checked ``imagesUnlabeled/`` cases plus the ``declared`` labeled-fraction cases, whose *images only* are
    taken from the training set (the dataset's label entries are never opened)."""
    cases = find_unlabeled_images(raw_dataset_folder, dataset_json, skip_bad, report)
    declared = list(declared)
    if declared:
        training = get_filenames_of_train_images_and_targets(str(raw_dataset_folder), dict(dataset_json))
        unknown = [c for c in declared if c not in training]
        if unknown:
            raise UnlabeledDataError(f"declared unlabeled case(s) {', '.join(unknown)} are not training cases of "
                                     f"{raw_dataset_folder}; fix the labeled-fraction file.")
        cases.update({c: training[c]["images"] for c in declared})
    return cases


def _source_stamp(files: Iterable[str]) -> list[list]:
    stamp = []
    for f in files:
        st = os.stat(f)
        stamp.append([os.path.abspath(f), st.st_size, st.st_mtime_ns])
    return stamp


def _plans_fingerprint(plans_manager: PlansManager, configuration_name: str, dataset_json: dict) -> str:
    relevant = {
        "plans": plans_manager.plans,
        "configuration": configuration_name,
        "channel_names": dataset_json.get("channel_names", dataset_json.get("modality")),
        "file_ending": dataset_json["file_ending"],
    }
    return hashlib.sha256(json.dumps(relevant, sort_keys=True, default=str).encode()).hexdigest()


def replace_atomic(write: Callable[[str], None], path: str | Path, prefix: str | None = None) -> None:
    """``write(tmp)`` into a temporary file beside ``path``, then rename it onto ``path``: readers (and a run
    killed meanwhile) never see a half-written file, and concurrent writers never share a temporary name.
    The temporary name is ``{prefix}<random>.tmp`` (default prefix ``.{name}.``)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=prefix or f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_text_atomic(text: str, path: str | Path) -> None:
    replace_atomic(lambda tmp: Path(tmp).write_text(text), path)


def write_json_atomic(obj, path: str | Path) -> None:
    """Write JSON to a temporary file beside ``path`` and rename it over ``path``."""
    write_text_atomic(json.dumps(obj, indent=2, sort_keys=True), path)


def check_channel_geometry(case: str, image_files: list[str]) -> None:
    """The channels of a case must share size, spacing, origin and orientation. nnU-Net's reader stops on a size or
    spacing mismatch without naming the problem and only warns about origin and orientation, which would pair
    voxels of different anatomy across channels. Checked from the headers (no voxels read) where SimpleITK reads
    the format."""
    if len(image_files) < 2 or not all(f.endswith(SITK_ENDINGS) for f in image_files):
        return
    import SimpleITK as sitk

    geometry = []
    for f in image_files:
        reader = sitk.ImageFileReader()
        reader.SetFileName(f)
        try:
            reader.ReadImageInformation()
        except RuntimeError as e:
            raise UnlabeledDataError(f"{f}: cannot read the image header of unlabeled case '{case}' ({e}). Re-export "
                                     f"the file or remove the case.") from None
        geometry.append((reader.GetSize(), reader.GetSpacing(), reader.GetOrigin(), reader.GetDirection()))
    ref_size, ref_spacing, ref_origin, ref_direction = geometry[0]
    for f, (size, spacing, origin, direction) in zip(image_files[1:], geometry[1:]):
        for what, a, b, tol in (("size", size, ref_size, 0), ("spacing", spacing, ref_spacing, 1e-4),
                                ("origin", origin, ref_origin, 1e-3), ("orientation", direction, ref_direction, 1e-4)):
            if len(a) != len(b) or any(abs(x - y) > tol * max(1.0, abs(y)) for x, y in zip(a, b)):
                raise UnlabeledDataError(
                    f"{f}: {what} {tuple(round(v, 5) for v in a)} differs from {image_files[0]} "
                    f"({tuple(round(v, 5) for v in b)}); all channels of unlabeled case '{case}' must share the same "
                    f"grid. Resample the channels onto one grid (co-register them) or remove the case.")


def _nonfinite_in_nifti(f: str) -> tuple[int, int]:
    """NaN and infinite voxels stored in a NIfTI file. ITK's NIfTI reader (nnU-Net's default SimpleITKIO) reads them
    as 0, which hides a broken export; nibabel reads the stored values. Only floating-point files can hold them."""
    import nibabel as nib
    import numpy as np

    img = nib.load(f)
    if img.get_data_dtype().kind != "f":
        return 0, 0
    stored = np.asanyarray(img.dataobj)
    return int(np.isnan(stored).sum()), int(np.isinf(stored).sum())


def check_image_content(data, image_files: list[str]) -> None:
    """Voxel values nnU-Net would accept silently: non-finite values (in what the reader returns, or stored in a
    NIfTI file and zeroed by ITK's reader) and constant channels (an all-zero image carries nothing to learn from)."""
    import numpy as np

    for c, f in enumerate(image_files):
        channel = data[c]
        n_nan, n_inf = int(np.isnan(channel).sum()), int(np.isinf(channel).sum())
        if n_nan == n_inf == 0 and f.endswith((".nii", ".nii.gz")):
            n_nan, n_inf = _nonfinite_in_nifti(f)
        if n_nan or n_inf:
            raise UnlabeledDataError(f"{f}: {n_nan} NaN and {n_inf} infinite voxel(s). Fix the image (e.g. replace "
                                     f"them with the background value) or remove the case.")
        if channel.size == 0 or channel.min() == channel.max():
            value = channel.flat[0] if channel.size else "no voxels"
            raise UnlabeledDataError(f"{f}: the image is constant ({value}); it carries nothing to learn from. "
                                     f"Check the export or remove the case.")


class _CheckingPlansManager(PlansManager):
    """The dataset's plans with a reader class that also runs ``check_image_content`` on what it reads, so the
    checks see the very arrays nnU-Net's preprocessor gets, without reading the files twice."""

    @property
    def image_reader_writer_class(self):
        base = PlansManager.image_reader_writer_class.fget(self)

        def read_images(reader, image_fnames, *args, **kwargs):
            data, properties = base.read_images(reader, image_fnames, *args, **kwargs)
            check_image_content(data, list(image_fnames))
            return data, properties

        return type(f"Checked{base.__name__}", (base,), {"read_images": read_images})


def _check_case(case: str, image_files: list[str], plans_manager: PlansManager) -> str | None:
    """The voxel and geometry checks of one case without preprocessing it: None, or the problem."""
    try:
        check_channel_geometry(case, image_files)
        _CheckingPlansManager(plans_manager.plans).image_reader_writer_class().read_images(image_files)
    except UnlabeledDataError as e:
        return str(e)
    except Exception as e:  # noqa: BLE001 -- any reader error becomes one that names the file
        return f"{image_files[0]}: could not read unlabeled case '{case}': {type(e).__name__}: {e}"
    return None


def check_unlabeled_cases(cases: dict[str, list[str]], plans_manager: PlansManager, num_processes: int) -> list[str]:
    """Read every case as preprocessing would and run its checks; return the problems (empty if all are fine)."""
    args = [(case, files, plans_manager) for case, files in sorted(cases.items())]
    if num_processes <= 1 or len(args) <= 1:
        results = [_check_case(*a) for a in args]
    else:
        with multiprocessing.get_context("spawn").Pool(min(num_processes, len(args))) as pool:
            results = pool.starmap(_check_case, args)
    return [r for r in results if r is not None]


def _preprocess_case(
    case: str, image_files: list[str], output_folder: str, plans_manager: PlansManager, configuration_name: str,
    dataset_json: dict,
) -> str:
    """Check and preprocess one case with the configuration's preprocessor (no segmentation) and move it into
    place."""
    check_channel_geometry(case, image_files)
    checking = _CheckingPlansManager(plans_manager.plans)
    cm = checking.get_configuration(configuration_name)
    tmp = tempfile.mkdtemp(dir=output_folder, prefix=".tmp_")
    try:
        try:
            cm.preprocessor_class(verbose=False).run_case_save(
                os.path.join(tmp, case), image_files, None, checking, cm, dataset_json
            )
        except UnlabeledDataError:
            raise
        except Exception as e:  # noqa: BLE001 -- any reader error becomes one that names the file
            raise UnlabeledDataError(
                f"{image_files[0]}: could not read or preprocess unlabeled case '{case}' ({len(image_files)} file(s): "
                f"{', '.join(image_files)}): {type(e).__name__}: {e}. Check that the file opens in a viewer and has "
                f"the same geometry in every channel; re-export it or remove the case."
            ) from None
        for suffix in OUTPUT_SUFFIXES:
            os.replace(os.path.join(tmp, case + suffix), os.path.join(output_folder, case + suffix))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return case


def _case_is_current(case: str, stamp: list, manifest: dict, output_folder: Path) -> bool:
    return manifest["cases"].get(case) == stamp and all((output_folder / (case + s)).is_file() for s in OUTPUT_SUFFIXES)


def _preprocess_case_or_problem(*args) -> tuple[str, str | None]:
    """``_preprocess_case`` returning ``(case, None)``, or ``(case, message)`` for bad input."""
    try:
        return _preprocess_case(*args), None
    except UnlabeledDataError as e:
        return args[0], str(e)


def preprocess_unlabeled(
    cases: dict[str, list[str]],
    output_folder: str | Path,
    plans_manager: PlansManager,
    configuration_name: str,
    dataset_json: dict,
    num_processes: int,
    progress: bool = True,
    skip_bad: bool = False,
    report: Callable[[str], None] = print,
) -> list[str]:
    """Check and preprocess the cases that are missing or stale in ``output_folder``; return the sorted ids of the
    cases ready for training.

    Cases already present and current are left untouched; the manifest is rewritten (atomically) after every
    finished case, so an interrupted run resumes where it stopped. A bad case (unreadable, non-finite or constant
    voxels, channels on different grids) stops with an error naming its file; with ``skip_bad`` it is left out,
    ``report`` gets the list, and it is tried again next time.
    """
    output_folder = Path(output_folder)
    output_folder.mkdir(parents=True, exist_ok=True)
    fingerprint = _plans_fingerprint(plans_manager, configuration_name, dataset_json)
    manifest_file = output_folder / MANIFEST
    manifest = json.loads(manifest_file.read_text()) if manifest_file.is_file() else {}
    if manifest.get("plans_fingerprint") != fingerprint:
        manifest = {"plans_fingerprint": fingerprint, "configuration": configuration_name, "cases": {}}
    stamps = {case: _source_stamp(files) for case, files in cases.items()}
    todo = sorted(c for c in cases if not _case_is_current(c, stamps[c], manifest, output_folder))
    problems: dict[str, str] = {}

    def done(result: tuple[str, str | None]) -> None:
        case, problem = result
        bar.update()
        if problem is not None:
            if not skip_bad:
                raise UnlabeledDataError(f"{problem}\n(To leave bad unlabeled cases out instead of stopping, set "
                                         f"{SKIP_BAD_HINT}.)")
            problems[case] = problem
            return
        manifest["cases"][case] = stamps[case]
        write_json_atomic(manifest, manifest_file)

    args = [(c, cases[c], str(output_folder), plans_manager, configuration_name, dataset_json) for c in todo]
    with tqdm(total=len(todo), desc="Preprocessing unlabeled cases", disable=not progress or not todo) as bar:
        if num_processes <= 1 or len(todo) <= 1:
            for a in args:
                done(_preprocess_case_or_problem(*a))
        else:
            _run_pool(args, min(num_processes, len(todo)), done)
    if problems:
        report(f"WARNING: left out {len(problems)} bad unlabeled case(s) (skip_bad_unlabeled):\n  "
               + "\n  ".join(problems.values()))
    return sorted(c for c in cases if c not in problems)


def _run_pool(args: list[tuple], num_processes: int, done) -> None:
    """Run ``_preprocess_case_or_problem`` in a spawn pool like nnU-Net's preprocessing: a dead worker (e.g. killed
    for memory) raises instead of hanging, and an unexpected worker error is re-raised as is."""
    with multiprocessing.get_context("spawn").Pool(num_processes) as pool:
        workers = list(pool._pool)
        pending = [pool.apply_async(_preprocess_case_or_problem, a) for a in args]
        while pending:
            if not all(w.is_alive() for w in workers):
                raise RuntimeError(
                    "A preprocessing worker died (most likely out of memory). Lower nnUNet_def_n_proc and run again; "
                    "finished cases are kept."
                )
            still = []
            for r in pending:
                if r.ready():
                    done(r.get())
                else:
                    still.append(r)
            pending = still
            time.sleep(0.05)
