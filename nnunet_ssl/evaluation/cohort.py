"""A brain-tissue cohort with real label scarcity, in nnU-Net raw format, built from real anatomies.

Every subject is one source anatomy (see ``anatomy.py``) under a random affine and a random smooth diffeomorphic
deformation, applied to image and label map together: each output voxel's position is mapped into the source,
where the image is interpolated linearly and the label map by nearest neighbour, so a subject's labels are
exactly the source's label values. The image then gets an anti-aliasing blur for its voxel size, a random
monotone contrast curve, a smooth multiplicative bias field, Rician noise and a global intensity scale.

Two populations make the scarcity real (extra warps of the same brain carry no new information):

- **narrow** (``narrow_*``): one source anatomy, mild contrast, bias and noise, one voxel size: "a few labeled
  scans from one site". The labeled cases of a benchmark are drawn from this pool (with no narrow pool,
  ``num_narrow=0``, from the wide training subjects: labeled and unlabeled images from one population, as in the
  papers' experiments);
- **wide** (``wide_*``, ``val_*``, ``test_*``): every source anatomy in turn, strong contrast, bias and noise
  variety, and thick slices along a random axis for part of the subjects: "many scans from everywhere".

Layout written to ``<raw>/Dataset{id:03d}_{name}``::

    imagesTr/  labelsTr/        narrow_*, wide_* and val_* (every training subject keeps its label so that the
                                benchmark's upper bound can use it; the harness declares the ones that play
                                "unlabeled" in ssl_unlabeled_cases.json, nnU-Net never sees them as labeled)
    imagesUnlabeled/            extra_* (wide population, no label anywhere; --extra-unlabeled, default 0)
    imagesTs/  labelsTs/        test_* (wide population, never used in training)
    dataset.json  cohort.json (pools, sources, voxel sizes, every random parameter)  SOURCES_LICENCE.txt

Everything is drawn from ``numpy.random.default_rng([seed, pool, index])``: the same seed gives the same files.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy.ndimage import gaussian_filter, map_coordinates, zoom

from nnunet_ssl.evaluation.anatomy import LABELS, SOURCES, Anatomy, AnatomyError, licence_text, load_anatomy

POOLS = ("narrow", "wide", "val", "test", "extra")
POOL_CODES = {p: i for i, p in enumerate(POOLS)}


@dataclass(frozen=True)
class Population:
    """Ranges of the random subject parameters."""

    rotation_deg: float  # each Euler angle ~ U(-r, r)
    scaling: float  # each axis' scale ~ 1 + U(-s, s)
    translation_mm: float  # each axis ~ U(-t, t)
    velocity_mm: float  # std of the stationary velocity field at the control points (~ deformation size)
    gamma: float  # log gamma ~ U(-g, g)
    contrast: float  # std of the log slopes of the piecewise-linear monotone intensity curve
    bias: float  # std of the log bias field at its control points
    noise: tuple[float, float]  # Rician noise std (white matter = 1) ~ U(lo, hi)
    intensity_scale: tuple[float, float]  # global scale ~ log-uniform(lo, hi)
    thick_slice_probability: float  # share of subjects with one axis' voxel size multiplied by a factor below
    thick_slice_factors: tuple[float, ...]
    t2_like_probability: float = 0.0  # share of subjects with a T2-like (inverted grey/white) contrast curve


NARROW = Population(rotation_deg=6, scaling=0.05, translation_mm=5, velocity_mm=2.5, gamma=0.08, contrast=0.03,
                    bias=0.08, noise=(0.01, 0.03), intensity_scale=(1000, 1000), thick_slice_probability=0.0,
                    thick_slice_factors=())
WIDE = Population(rotation_deg=12, scaling=0.1, translation_mm=10, velocity_mm=3.5, gamma=0.45, contrast=0.3,
                  bias=0.3, noise=(0.01, 0.08), intensity_scale=(100, 3000), thick_slice_probability=0.5,
                  thick_slice_factors=(1.5, 2.0, 2.5))


@dataclass
class CohortConfig:
    dataset_id: int = 701
    name: str = "BrainCohort"
    seed: int = 0
    spacing: float = 3.0  # isotropic voxel size (mm) of subjects without thick slices
    num_narrow: int = 8  # the pool labeled cases are drawn from; 0: from the wide training subjects
    num_wide: int = 24  # training subjects that play "unlabeled"
    num_val: int = 4
    num_test: int = 16
    num_extra_unlabeled: int = 0
    sources: tuple[str, ...] = ("mni152", "fsaverage")
    narrow_source: str = "mni152"
    margin_mm: float = 8.0  # field of view: the largest brain bounding box plus this on each side
    control_spacing_mm: float = 32.0  # spacing of the deformation's and bias field's control points
    narrow: Population = field(default_factory=lambda: NARROW)
    wide: Population = field(default_factory=lambda: WIDE)

    def check(self) -> None:
        problems = []
        for s in self.sources:
            if s not in SOURCES:
                problems.append(f"unknown source '{s}' (available: {', '.join(SOURCES)})")
        if self.narrow_source not in SOURCES:
            problems.append(f"unknown narrow source '{self.narrow_source}' (available: {', '.join(SOURCES)})")
        if not 0 < self.spacing <= 10:
            problems.append(f"spacing {self.spacing} mm: give a voxel size in (0, 10] mm")
        if self.num_narrow == 1 or self.num_narrow < 0:
            problems.append(f"num_narrow {self.num_narrow}: the labeled pool needs at least 2 subjects "
                            "(or 0: labeled cases drawn from the wide training subjects)")
        if self.num_narrow == 0 and self.num_wide < 3:
            problems.append(f"num_wide {self.num_wide}: without a narrow pool the labeled cases come from the wide "
                            "training subjects; give at least 3 (two to label, one to stay unlabeled)")
        if self.num_val < 1 or self.num_test < 1:
            problems.append("num_val and num_test must be at least 1")
        if min(self.num_wide, self.num_extra_unlabeled) < 0:
            problems.append("num_wide and num_extra_unlabeled cannot be negative")
        if not 1 <= self.dataset_id <= 999:
            problems.append(f"dataset id {self.dataset_id}: nnU-Net ids are 1 to 999")
        if problems:
            raise ValueError("bad cohort settings:\n  " + "\n  ".join(problems))


# ---------------------------------------------------------------------------------------------- geometry
def _rotation(rng: np.random.Generator, max_deg: float) -> np.ndarray:
    a = np.deg2rad(rng.uniform(-max_deg, max_deg, 3))
    cx, cy, cz, sx, sy, sz = *np.cos(a), *np.sin(a)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def _smooth_field(rng: np.random.Generator, channels: int, fov_mm: np.ndarray, control_mm: float,
                  shape: tuple[int, ...], std: float) -> np.ndarray:
    """Gaussian values on a coarse control grid over the field of view, cubic-interpolated to ``shape``."""
    coarse_shape = tuple(int(max(3, np.ceil(f / control_mm) + 1)) for f in fov_mm)
    coarse = rng.normal(0.0, std, (channels, *coarse_shape))
    return np.stack([zoom(c, [s / cs for s, cs in zip(shape, coarse_shape)], order=3, mode="nearest",
                          grid_mode=True) for c in coarse]).astype(np.float32)


def _exp_velocity(velocity_mm: np.ndarray, spacing: np.ndarray, steps: int = 6) -> np.ndarray:
    """Displacement (mm) of the diffeomorphism exp(v) by scaling and squaring: u <- u + u o (id + u)."""
    disp = velocity_mm / 2 ** steps
    grid = np.indices(disp.shape[1:], dtype=np.float32)
    for _ in range(steps):
        coords = grid + disp / spacing[:, None, None, None]
        disp = disp + np.stack([map_coordinates(d, coords, order=1, mode="nearest") for d in disp])
    return disp


# ---------------------------------------------------------------------------------------------- intensities
CURVE_KNOTS = np.array([0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 4.0], np.float32)


T2_LIKE = np.array([0.0, 0.9, 1.0, 0.75, 0.45, 0.4, 0.4, 0.4], np.float32)  # CSF bright, grey > white matter


def _contrast_curve(rng: np.random.Generator, pop: Population) -> tuple[np.ndarray, float]:
    """A random monotone piecewise-linear curve (white matter stays at 1) and a gamma; with probability
    ``t2_like_probability`` a T2-like curve (dark white matter, brighter grey matter and CSF) with random jitter."""
    if pop.t2_like_probability > 0 and rng.uniform() < pop.t2_like_probability:  # no draw when off: same cohort
        y = T2_LIKE * np.exp(rng.normal(0.0, pop.contrast, len(T2_LIKE))).astype(np.float32)
        y[0] = 0.0
        return y / y.max(), float(np.exp(rng.uniform(-pop.gamma, pop.gamma)))
    slopes = np.exp(rng.normal(0.0, pop.contrast, len(CURVE_KNOTS) - 1))
    y = np.concatenate([[0.0], np.cumsum(slopes * np.diff(CURVE_KNOTS))])
    y = y / np.interp(1.0, CURVE_KNOTS, y)
    return y.astype(np.float32), float(np.exp(rng.uniform(-pop.gamma, pop.gamma)))


@dataclass
class Subject:
    case: str
    pool: str
    source: str
    spacing: list[float]  # x, y, z (RAS axes), mm
    shape: list[int]
    params: dict


class CohortBuilder:
    def __init__(self, config: CohortConfig, cache: str | Path, anatomies: dict[str, Anatomy] | None = None):
        """``anatomies`` replaces the registry sources (tests use small synthetic ones)."""
        self.cache = Path(cache)
        # the narrow source only where there is a narrow pool: --narrow 0 fetches and frames only what it uses
        names = sorted(set(config.sources) | ({config.narrow_source} if config.num_narrow else set()))
        if anatomies is None:
            config.check()
            anatomies = {s: load_anatomy(s, self.cache) for s in names}  # a missing package fails before writing
        self.cfg = config
        self.anatomies = anatomies
        self.fov_mm = np.max([a.extent_mm for a in self.anatomies.values()], axis=0) + 2 * config.margin_mm
        self._blurred: dict[tuple, np.ndarray] = {}

    def _source_image(self, source: str, spacing: np.ndarray) -> np.ndarray:
        """The source image blurred for the subject's voxel size (Gaussian with FWHM = voxel size)."""
        key = (source, *np.round(spacing, 4))
        if key not in self._blurred:
            if len(self._blurred) > 8:
                self._blurred.clear()
            a = self.anatomies[source]
            src_spacing = np.sqrt((a.affine[:3, :3] ** 2).sum(0))
            sigma = np.sqrt(np.clip(spacing ** 2 - src_spacing ** 2, 0, None)) / 2.3548 / src_spacing
            self._blurred[key] = gaussian_filter(a.image, sigma, mode="constant")
        return self._blurred[key]

    def subject(self, pool: str, index: int) -> tuple[Subject, np.ndarray, np.ndarray]:
        """Image (float32) and labels (uint8), both in RAS voxel order (x, y, z), and the subject's record."""
        cfg = self.cfg
        pop = cfg.narrow if pool == "narrow" else cfg.wide
        rng = np.random.default_rng([cfg.seed, POOL_CODES[pool], index])
        sources = [cfg.narrow_source] if pool == "narrow" else list(cfg.sources)
        source = sources[index % len(sources)]
        anat = self.anatomies[source]

        spacing = np.full(3, cfg.spacing)
        thick_axis, factor = None, 1.0
        if pop.thick_slice_factors and rng.uniform() < pop.thick_slice_probability:
            thick_axis = int(rng.integers(3))
            factor = float(rng.choice(pop.thick_slice_factors))
            spacing[thick_axis] *= factor
        shape = tuple(int(np.ceil(f / s)) for f, s in zip(self.fov_mm, spacing))
        rot = _rotation(rng, pop.rotation_deg)
        scale = 1 + rng.uniform(-pop.scaling, pop.scaling, 3)
        shift = rng.uniform(-pop.translation_mm, pop.translation_mm, 3)
        velocity = _smooth_field(rng, 3, self.fov_mm, cfg.control_spacing_mm, shape, pop.velocity_mm)
        curve, gamma = _contrast_curve(rng, pop)
        log_bias = _smooth_field(rng, 1, self.fov_mm, cfg.control_spacing_mm * 1.5, shape, pop.bias)[0]
        noise_std = float(rng.uniform(*pop.noise))
        intensity_scale = float(np.exp(rng.uniform(*np.log(pop.intensity_scale))))

        # output voxel -> subject mm (centred on the field of view) -> deformed -> affine -> source mm -> voxel
        grid = np.indices(shape, dtype=np.float32)
        pos = (grid - (np.asarray(shape, np.float32) - 1)[:, None, None, None] / 2) * \
            spacing.astype(np.float32)[:, None, None, None]
        pos = pos + _exp_velocity(velocity, spacing)
        lin = (rot * scale[None, :]).astype(np.float32)
        src_mm = np.einsum("ij,j...->i...", lin, pos) + (anat.centre_mm + shift).astype(np.float32)[:, None, None, None]
        inv = np.linalg.inv(anat.affine).astype(np.float32)
        vox = np.einsum("ij,j...->i...", inv[:3, :3], src_mm) + inv[:3, 3][:, None, None, None]

        labels = map_coordinates(anat.labels, vox, order=0, mode="constant", cval=0).astype(np.uint8)
        x = map_coordinates(self._source_image(source, spacing), vox, order=1, mode="constant", cval=0.0)
        x = np.interp(np.clip(x, 0, None), CURVE_KNOTS, curve).astype(np.float32) ** gamma
        x = x * np.exp(log_bias)
        n1, n2 = rng.normal(0, noise_std, (2, *shape)).astype(np.float32)
        x = np.sqrt((x + n1) ** 2 + n2 ** 2) * intensity_scale

        record = Subject(f"{pool}_{index:03d}", pool, source, [float(s) for s in spacing], list(shape), {
            "rotation": np.round(rot, 6).tolist(), "scaling": np.round(scale, 6).tolist(),
            "translation_mm": np.round(shift, 4).tolist(), "gamma": round(gamma, 6),
            "contrast_curve": np.round(curve, 6).tolist(), "noise_std": round(noise_std, 6),
            "intensity_scale": round(intensity_scale, 4), "thick_slice_axis": thick_axis,
            "thick_slice_factor": factor})
        return record, x.astype(np.float32), labels

    # ------------------------------------------------------------------------------------------ writing
    def _write(self, array: np.ndarray, spacing: list[float], path: Path) -> None:
        img = sitk.GetImageFromArray(np.ascontiguousarray(array.transpose(2, 1, 0)))  # (x, y, z) -> ITK's (z, y, x)
        img.SetSpacing([float(s) for s in spacing])
        img.SetDirection((-1.0, 0, 0, 0, -1.0, 0, 0, 0, 1.0))  # RAS voxel axes in ITK's LPS world
        sitk.WriteImage(img, str(path), useCompression=True)

    def build(self, raw_root: str | Path, overwrite: bool = False, progress=print) -> Path:
        cfg = self.cfg
        folder = Path(raw_root) / f"Dataset{cfg.dataset_id:03d}_{cfg.name}"
        existing = list(Path(raw_root).glob(f"Dataset{cfg.dataset_id:03d}_*")) if Path(raw_root).is_dir() else []
        if existing and not overwrite:
            raise FileExistsError(f"{existing[0]} exists; pass --overwrite to replace it or choose another id (-d).")
        Path(raw_root).mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".Dataset{cfg.dataset_id:03d}_", dir=raw_root))
        try:
            for sub in ("imagesTr", "labelsTr", "imagesUnlabeled", "imagesTs", "labelsTs"):
                (tmp / sub).mkdir()
            counts = {"narrow": cfg.num_narrow, "wide": cfg.num_wide, "val": cfg.num_val, "test": cfg.num_test,
                      "extra": cfg.num_extra_unlabeled}
            records = []
            for pool, n in counts.items():
                images, labels = {"test": ("imagesTs", "labelsTs"), "extra": ("imagesUnlabeled", None)}.get(
                    pool, ("imagesTr", "labelsTr"))
                for i in range(n):
                    rec, img, lab = self.subject(pool, i)
                    self._write(img, rec.spacing, tmp / images / f"{rec.case}_0000.nii.gz")
                    if labels:
                        self._write(lab, rec.spacing, tmp / labels / f"{rec.case}.nii.gz")
                    records.append(rec)
                    progress(f"{rec.case}: {rec.source}, spacing {rec.spacing}, shape {rec.shape}")
            num_training = cfg.num_narrow + cfg.num_wide + cfg.num_val
            dataset_json = {
                "channel_names": {"0": "T1"},
                "labels": dict(LABELS),
                "numTraining": num_training,
                "file_ending": ".nii.gz",
                "name": cfg.name,
                "description": "Brain tissue cohort made by nnunet_ssl make-cohort from real template anatomies "
                               "(see cohort.json and SOURCES_LICENCE.txt).",
                "licence": "; ".join(SOURCES[s].licence for s in sorted({r.source for r in records} & set(SOURCES))),
            }
            (tmp / "dataset.json").write_text(json.dumps(dataset_json, indent=2))
            pools = {p: [r.case for r in records if r.pool == p] for p in POOLS}
            cohort = {"config": _config_dict(cfg), "fov_mm": np.round(self.fov_mm, 3).tolist(),
                      "pools": pools, "labeled_pool": pools["narrow"] or pools["wide"], "validation": pools["val"],
                      "subjects": [asdict(r) for r in records]}
            (tmp / "cohort.json").write_text(json.dumps(cohort, indent=1))
            used = sorted({r.source for r in records} & set(SOURCES))
            (tmp / "SOURCES_LICENCE.txt").write_text(licence_text(used, self.cache))
            if folder.exists():
                shutil.rmtree(folder)
            for old in existing:
                if old.exists():
                    shutil.rmtree(old)
            os.replace(tmp, folder)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp)
        return folder


def _config_dict(cfg: CohortConfig) -> dict:
    d = asdict(cfg)
    d["sources"] = list(cfg.sources)
    return d


def build_cohort(config: CohortConfig, raw_root: str | Path, cache: str | Path, overwrite: bool = False,
                 progress=print) -> Path:
    """Build the cohort (fetching the source anatomies first: a missing package fails before anything is
    written)."""
    try:
        builder = CohortBuilder(config, cache)
    except AnatomyError as e:
        raise SystemExit(f"error: {e}") from None
    return builder.build(raw_root, overwrite, progress)
