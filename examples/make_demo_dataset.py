"""Generate a small synthetic 3D dataset in nnU-Net v2 raw format.

The dataset is meant for the quickstart and the tests: it is small enough to
train on a couple of CPU cores in minutes, yet varied enough (random organ
pose/size, lesion polarity, bias field, noise, global intensity scaling) that
unlabeled cases carry useful information for semi-supervised training.

Layout written to ``<raw_root>/Dataset{id:03d}_{name}``::

    imagesTr/demo_000_0000.nii.gz    labelsTr/demo_000.nii.gz      (labeled)
    imagesUnlabeled/demo_004_0000.nii.gz                           (images only)
    imagesTs/demo_020_0000.nii.gz    labelsTs/demo_020.nii.gz      (held-out test)
    dataset.json

Labels: 0 background, 1 organ (large rotated ellipsoid), 2 lesion (small
ellipsoid inside the organ). With ``regions=True`` the same label maps are
declared as nnU-Net regions (organ = {1, 2}, lesion = {2}).

Usage::

    python examples/make_demo_dataset.py --raw /path/to/nnUNet_raw [--id 990]
        [--labeled 4] [--unlabeled 16] [--test 8] [--size 40] [--seed 0] [--regions]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy.ndimage import distance_transform_edt, gaussian_filter

Shape3 = tuple[int, int, int]

SUBFOLDERS = ("imagesTr", "labelsTr", "imagesUnlabeled", "imagesTs", "labelsTs")


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    """Uniformly distributed random 3x3 rotation matrix (QR of a Gaussian matrix)."""
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    # Sign fix makes the distribution uniform (Haar); det fix excludes reflections.
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


def _ellipsoid(
    grid: tuple[np.ndarray, np.ndarray, np.ndarray],
    center: np.ndarray,
    semi_axes: np.ndarray,
    rotation: np.ndarray,
) -> np.ndarray:
    """Boolean mask of a rotated ellipsoid, evaluated by broadcasting open grids."""
    d = [g - c for g, c in zip(grid, center)]
    q = np.zeros(np.broadcast_shapes(*(g.shape for g in grid)), dtype=np.float32)
    for k in range(3):
        # Coordinate along the k-th ellipsoid axis (columns of the rotation).
        local = rotation[0, k] * d[0] + rotation[1, k] * d[1] + rotation[2, k] * d[2]
        q += (local / semi_axes[k]) ** 2
    return q <= 1.0


def _bias_field(
    grid: tuple[np.ndarray, np.ndarray, np.ndarray], shape: Shape3, rng: np.random.Generator
) -> np.ndarray:
    """Smooth multiplicative field (~0.75-1.3) built from a few low-frequency cosines."""
    log_field = np.zeros(shape, dtype=np.float32)
    for _ in range(3):
        # < 1 cycle across the image keeps it low-frequency like a coil sensitivity profile.
        freq = rng.uniform(-0.8, 0.8, size=3) / np.asarray(shape)
        phase = rng.uniform(0, 2 * np.pi)
        arg = 2 * np.pi * (freq[0] * grid[0] + freq[1] * grid[1] + freq[2] * grid[2]) + phase
        log_field += rng.uniform(0.05, 0.12) * np.cos(arg)
    return np.exp(log_field)


def _make_case(shape: Shape3, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Return (image float32, label uint8) arrays of the given shape."""
    grid = np.ogrid[: shape[0], : shape[1], : shape[2]]
    size = np.asarray(shape, dtype=np.float64)

    # Organ: large ellipsoid; the center jitter lets it touch/cross the border sometimes.
    organ_axes = rng.uniform(0.25, 0.40, size=3) * size
    organ_center = rng.uniform(0.38, 0.62, size=3) * (size - 1)
    organ = _ellipsoid(grid, organ_center, organ_axes, _random_rotation(rng))

    label = organ.astype(np.uint8)
    # Distance to the organ surface lets us place lesions fully inside the organ.
    depth = distance_transform_edt(organ)
    n_lesions = 2 if rng.random() < 0.25 else 1
    for _ in range(n_lesions):
        radius = rng.uniform(2.5, 5.0)
        candidates = np.argwhere(depth >= radius + 1.0)
        if len(candidates) == 0:  # very thin organ: fall back to its deepest voxels
            candidates = np.argwhere(depth >= depth.max() - 0.5)
        center = candidates[rng.integers(len(candidates))].astype(np.float64)
        axes = radius * rng.uniform(0.8, 1.2, size=3)
        lesion = _ellipsoid(grid, center, axes, _random_rotation(rng)) & organ
        label[lesion] = 2

    # Piecewise-constant intensities; lesion polarity varies so the model cannot
    # rely on "brighter = lesion".
    organ_mean = rng.uniform(0.8, 1.2)
    image = np.zeros(shape, dtype=np.float32)
    image[label == 1] = organ_mean
    image[label == 2] = organ_mean + rng.choice([-1.0, 1.0]) * rng.uniform(0.5, 0.8)
    # Slight blur mimics partial-volume effects so boundaries are not perfectly sharp.
    image = gaussian_filter(image, sigma=0.6)
    image *= _bias_field(grid, shape, rng)
    image += rng.normal(0.0, rng.uniform(0.25, 0.35), size=shape).astype(np.float32)
    # Arbitrary MRI-like units: nnU-Net's z-score normalisation must cope with this.
    image = image * np.exp(rng.uniform(np.log(50.0), np.log(500.0))) + rng.uniform(0.0, 100.0)
    return image.astype(np.float32), label


def _write(array: np.ndarray, path: Path) -> None:
    img = sitk.GetImageFromArray(array)
    img.SetSpacing((1.0, 1.0, 1.0))
    sitk.WriteImage(img, str(path), useCompression=True)


def make_demo_dataset(
    raw_root: str | Path,
    dataset_id: int = 990,
    name: str = "SSLDemo",
    n_labeled: int = 4,
    n_unlabeled: int = 16,
    n_test: int = 8,
    shape: Shape3 = (40, 40, 40),
    seed: int = 0,
    regions: bool = False,
) -> Path:
    """Write the synthetic dataset and return its folder ``raw_root/Dataset{id:03d}_{name}``.

    Existing image/label subfolders of that dataset folder are replaced so that
    re-running with different counts leaves no stale cases behind.
    """
    if n_labeled < 1 or n_unlabeled < 0 or n_test < 0:
        raise ValueError("need n_labeled >= 1 and non-negative n_unlabeled/n_test")
    if len(shape) != 3 or min(shape) < 16:
        raise ValueError(f"shape must be 3D with every side >= 16, got {shape}")
    raw_root = Path(raw_root)
    folder_name = f"Dataset{dataset_id:03d}_{name}"
    out = raw_root / folder_name

    # nnU-Net resolves datasets by ID, so a second folder with the same ID breaks it.
    clashes = [p.name for p in raw_root.glob(f"Dataset{dataset_id:03d}_*") if p.name != folder_name]
    if clashes:
        raise FileExistsError(f"dataset id {dataset_id} already used by {clashes} in {raw_root}")

    for sub in SUBFOLDERS:
        shutil.rmtree(out / sub, ignore_errors=True)
        (out / sub).mkdir(parents=True)

    rng = np.random.default_rng(seed)
    splits = (
        [("imagesTr", "labelsTr")] * n_labeled
        + [("imagesUnlabeled", None)] * n_unlabeled
        + [("imagesTs", "labelsTs")] * n_test
    )
    for i, (img_dir, lbl_dir) in enumerate(splits):
        case = f"demo_{i:03d}"
        # Every case consumes the same random stream whatever its split, so case i
        # is identical across runs with the same seed even if split sizes change.
        image, label = _make_case(tuple(int(s) for s in shape), rng)
        _write(image, out / img_dir / f"{case}_0000.nii.gz")
        if lbl_dir is not None:
            _write(label, out / lbl_dir / f"{case}.nii.gz")

    if regions:
        # Region-based training: region "organ" = labels {1, 2}, "lesion" = {2};
        # regions_class_order maps predicted regions back to label values.
        labels: dict[str, int | list[int]] = {"background": 0, "organ": [1, 2], "lesion": 2}
    else:
        labels = {"background": 0, "organ": 1, "lesion": 2}
    dataset_json: dict[str, object] = {
        "name": name,
        "description": "Synthetic 3D organ/lesion demo dataset for nnunet-ssl "
        f"(seed={seed}, {n_unlabeled} unlabeled cases in imagesUnlabeled)",
        "channel_names": {"0": "MRI"},
        "labels": labels,
        "numTraining": n_labeled,
        "file_ending": ".nii.gz",
    }
    if regions:
        dataset_json["regions_class_order"] = [1, 2]
    (out / "dataset.json").write_text(json.dumps(dataset_json, indent=4) + "\n")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--raw", help="nnU-Net raw folder (default: $nnUNet_raw)")
    parser.add_argument("--id", type=int, default=990, help="dataset id (default 990)")
    parser.add_argument("--name", default="SSLDemo", help="dataset name (default SSLDemo)")
    parser.add_argument("--labeled", type=int, default=4, help="labeled training cases")
    parser.add_argument("--unlabeled", type=int, default=16, help="unlabeled cases")
    parser.add_argument("--test", type=int, default=8, help="labeled test cases")
    parser.add_argument("--size", type=int, default=40, help="cube side length in voxels")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    parser.add_argument("--regions", action="store_true", help="declare region-based labels")
    args = parser.parse_args(argv)

    raw = args.raw or os.environ.get("nnUNet_raw")
    if not raw:
        parser.error("no output folder: pass --raw <dir> or set the nnUNet_raw environment variable")

    start = time.perf_counter()
    out = make_demo_dataset(
        raw,
        dataset_id=args.id,
        name=args.name,
        n_labeled=args.labeled,
        n_unlabeled=args.unlabeled,
        n_test=args.test,
        shape=(args.size, args.size, args.size),
        seed=args.seed,
        regions=args.regions,
    )
    n = args.labeled + args.unlabeled + args.test
    print(f"Wrote {n} cases to {out} in {time.perf_counter() - start:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
