"""Calibration of predicted probabilities: expected calibration error (ECE) and reliability diagrams.

Following Guo et al. (2017), as the MisMatch paper does (section 4): the voxels are grouped into M = 15 equal-width
confidence bins I_m = ((m - 1) / M, m / M] (a confidence of exactly 0 joins the first bin), and

    acc(B_m) = 1/|B_m| sum_{i in B_m} 1(y^_i = y_i),   conf(B_m) = 1/|B_m| sum_{i in B_m} p^_i,
    ECE = sum_m |B_m| / n * |acc(B_m) - conf(B_m)|.

What a sample is: one decision of the segmentation, with the probability that made it.

- Softmax (label) datasets: one decision per voxel, the predicted label y^ = argmax_c p_c with confidence
  p^ = max_c p_c; it is correct if it equals the reference label.
- Region-based datasets (sigmoid per region): one decision per voxel and region r, "inside r" if p_r > 0.5 (as
  nnU-Net thresholds) with confidence max(p_r, 1 - p_r); correct if it matches the reference's membership in r.

Which samples enter an ECE (voxels with the ignore label never do):

- ``all``: every voxel (the paper's ECE; dominated by easy background far from any structure);
- ``foreground``: the voxels where the reference or the prediction is foreground (not background), i.e. the
  union of the reference and predicted structures, where calibration matters and where MisMatch's learnt
  dilation and erosion act. For regions: per region, the voxels inside r in the reference or the prediction,
  pooled over regions;
- per class c (key as in nnU-Net's ``summary.json``: ``"1"``, or ``"(1, 2)"`` for a region): the voxels where the
  reference or the prediction is c (for a region: inside r in either).

A folder's figures are given twice: ``pooled`` (the bins of all cases added up, then one ECE: the dataset's
reliability diagram) and ``mean`` (the mean over cases of each case's ECE; cases where a set is empty are left
out). The reliability diagram (PNG) draws the pooled foreground and per-class bins.
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from nnunet_ssl.data.unlabeled import replace_atomic, write_json_atomic

N_BINS = 15
JSON_NAME = "calibration.json"
DIAGRAM_NAME = "reliability_diagram.png"


# ---------------------------------------------------------------- bins and ECE
@dataclass
class CalibrationBins:
    """Per-bin sample counts and sums of confidence and correctness (additive across cases)."""

    n_bins: int = N_BINS
    count: np.ndarray = field(default=None)
    confidence_sum: np.ndarray = field(default=None)
    correct_sum: np.ndarray = field(default=None)

    def __post_init__(self):
        for name in ("count", "confidence_sum", "correct_sum"):
            if getattr(self, name) is None:
                setattr(self, name, np.zeros(self.n_bins, dtype=np.float64))

    @classmethod
    def from_samples(cls, confidence: np.ndarray, correct: np.ndarray, n_bins: int = N_BINS) -> CalibrationBins:
        confidence = np.asarray(confidence, dtype=np.float64).ravel()
        correct = np.asarray(correct, dtype=np.float64).ravel()
        if confidence.shape != correct.shape:
            raise ValueError(f"confidence ({confidence.shape}) and correct ({correct.shape}) differ in size")
        # bin m holds ((m - 1) / M, m / M]; 0 goes to the first bin
        index = np.clip(np.ceil(confidence * n_bins).astype(np.int64) - 1, 0, n_bins - 1)
        return cls(n_bins, np.bincount(index, minlength=n_bins).astype(np.float64),
                   np.bincount(index, weights=confidence, minlength=n_bins),
                   np.bincount(index, weights=correct, minlength=n_bins))

    def __add__(self, other: CalibrationBins) -> CalibrationBins:
        if self.n_bins != other.n_bins:
            raise ValueError(f"cannot add {self.n_bins} bins to {other.n_bins} bins")
        return CalibrationBins(self.n_bins, self.count + other.count, self.confidence_sum + other.confidence_sum,
                               self.correct_sum + other.correct_sum)

    @property
    def total(self) -> int:
        return int(self.count.sum())

    def accuracy(self) -> np.ndarray:
        """acc(B_m) per bin (NaN for empty bins)."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return self.correct_sum / self.count

    def confidence(self) -> np.ndarray:
        """conf(B_m) per bin (NaN for empty bins)."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return self.confidence_sum / self.count

    def ece(self) -> float:
        """sum_m |B_m| / n |acc(B_m) - conf(B_m)| (NaN without samples)."""
        n = self.count.sum()
        if n == 0:
            return float("nan")
        return float(np.abs(self.correct_sum - self.confidence_sum).sum() / n)

    def summary(self, with_bins: bool = False) -> dict[str, Any]:
        n = self.count.sum()
        out: dict[str, Any] = {
            "ECE": _json_float(self.ece()),
            "num_samples": self.total,
            "accuracy": _json_float(self.correct_sum.sum() / n if n else float("nan")),
            "confidence": _json_float(self.confidence_sum.sum() / n if n else float("nan")),
        }
        if with_bins:
            edges = np.linspace(0, 1, self.n_bins + 1)
            out["bins"] = {"lower": edges[:-1].tolist(), "upper": edges[1:].tolist(),
                           "count": [int(c) for c in self.count],
                           "accuracy": [_json_float(v) for v in self.accuracy()],
                           "confidence": [_json_float(v) for v in self.confidence()]}
        return out


def _json_float(value: float) -> float | None:
    return None if not np.isfinite(value) else float(value)


def expected_calibration_error(confidence: np.ndarray, correct: np.ndarray, n_bins: int = N_BINS) -> float:
    """ECE of samples with confidences in [0, 1] and correctness (bool or 0/1) over ``n_bins`` equal-width bins."""
    return CalibrationBins.from_samples(confidence, correct, n_bins).ece()


# ---------------------------------------------------------------- one case
def label_key(label_or_region: int | Sequence[int]) -> str:
    """nnU-Net's key for a label or region in summary.json ("1", "(1, 2)")."""
    return str(tuple(label_or_region) if isinstance(label_or_region, (list, tuple)) else label_or_region)


def case_calibration(probabilities: np.ndarray, reference: np.ndarray,
                     labels_or_regions: Sequence[int | Sequence[int]], regions: bool,
                     ignore_label: int | None = None, n_bins: int = N_BINS) -> dict[str, Any]:
    """The calibration bins of one case: ``{'all': bins, 'foreground': bins, 'classes': {key: bins}}``.

    ``probabilities``: (channels, *spatial), softmax over labels 0..K-1 (channel = label) or sigmoid per region
    (channel i = ``labels_or_regions[i]``); ``reference``: (*spatial) or (1, *spatial) label map;
    ``labels_or_regions``: the foreground labels (softmax) or the regions in channel order (regions)."""
    from nnunetv2.evaluation.evaluate_predictions import region_or_label_to_mask

    reference = np.asarray(reference)
    if reference.ndim == probabilities.ndim:
        reference = reference[0]
    if reference.shape != probabilities.shape[1:]:
        raise ValueError(f"reference shape {reference.shape} does not match the probabilities' {probabilities.shape[1:]}")
    valid = np.ones(reference.shape, dtype=bool) if ignore_label is None else reference != ignore_label
    result: dict[str, Any] = {"classes": {}}

    def bins(confidence, correct, mask) -> CalibrationBins:
        return CalibrationBins.from_samples(confidence[mask], correct[mask], n_bins)

    if not regions:
        if probabilities.shape[0] <= max(labels_or_regions, default=0):
            raise ValueError(f"{probabilities.shape[0]} probability channels but labels up to "
                             f"{max(labels_or_regions)}")
        confidence = probabilities.max(0)
        predicted = probabilities.argmax(0)
        correct = predicted == reference
        result["all"] = bins(confidence, correct, valid)
        result["foreground"] = bins(confidence, correct, valid & ((reference != 0) | (predicted != 0)))
        for label in labels_or_regions:
            result["classes"][label_key(label)] = bins(confidence, correct,
                                                       valid & ((reference == label) | (predicted == label)))
        return result

    if probabilities.shape[0] != len(labels_or_regions):
        raise ValueError(f"{probabilities.shape[0]} probability channels for {len(labels_or_regions)} regions")
    total_all, total_fg = CalibrationBins(n_bins), CalibrationBins(n_bins)
    for channel, region in enumerate(labels_or_regions):
        p = probabilities[channel]
        inside = p > 0.5
        confidence = np.where(inside, p, 1 - p)
        in_reference = region_or_label_to_mask(reference, region)
        correct = inside == in_reference
        region_bins = bins(confidence, correct, valid & (in_reference | inside))
        result["classes"][label_key(region)] = region_bins
        total_all = total_all + bins(confidence, correct, valid)
        total_fg = total_fg + region_bins
    result["all"], result["foreground"] = total_all, total_fg
    return result


# ---------------------------------------------------------------- a folder of nnU-Net predictions
def _calibrate_file(probabilities_file: str, properties_file: str, reference_file: str, reader_writer,
                    labels_or_regions, regions: bool, ignore_label, n_bins: int) -> dict[str, Any]:
    with np.load(probabilities_file) as npz:
        probabilities = npz["probabilities"]
    with open(properties_file, "rb") as f:
        properties = pickle.load(f)
    reference, reference_properties = reader_writer.read_seg(reference_file)
    if probabilities.shape[1:] != reference.shape[1:]:
        raise ValueError(f"{probabilities_file} holds probabilities of shape {probabilities.shape[1:]}, but the "
                         f"reference {reference_file} has shape {reference.shape[1:]}: not the same image geometry.")
    spacing, ref_spacing = properties.get("spacing"), reference_properties.get("spacing")
    if spacing is not None and ref_spacing is not None and not np.allclose(spacing, ref_spacing, rtol=1e-3):
        raise ValueError(f"{properties_file} gives spacing {list(spacing)} but the reference {reference_file} has "
                         f"{list(ref_spacing)}: the prediction belongs to another image.")
    return case_calibration(probabilities, reference, labels_or_regions, regions, ignore_label, n_bins)


def find_prediction_cases(prediction_folder: str | os.PathLike, cases: Iterable[str] | None = None) -> list[str]:
    """Cases with probabilities (``{case}.npz`` and ``{case}.pkl``, as nnU-Net writes with --save_probabilities)."""
    folder = Path(prediction_folder)
    if cases is None:
        cases = sorted(p.name[:-4] for p in folder.glob("*.npz"))
    cases = list(cases)
    if not cases:
        raise FileNotFoundError(f"no probabilities (.npz) in {folder}: predict with `nnUNetv2_predict ... "
                                f"--save_probabilities` (or validate with `nnUNetv2_train ... --npz`).")
    missing = [f"{c}{ext}" for c in cases for ext in (".npz", ".pkl") if not (folder / f"{c}{ext}").is_file()]
    if missing:
        raise FileNotFoundError(f"missing in {folder}: {', '.join(missing[:10])}"
                                f"{' ...' if len(missing) > 10 else ''} (nnU-Net writes {{case}}.npz and "
                                f"{{case}}.pkl with --save_probabilities).")
    return cases


def calibration_on_folder(reference_folder: str | os.PathLike, prediction_folder: str | os.PathLike,
                          dataset_json: dict, plans: dict, output_json: str | os.PathLike | None = None,
                          output_png: str | os.PathLike | None = None, cases: Iterable[str] | None = None,
                          num_processes: int | None = None, n_bins: int = N_BINS) -> dict[str, Any]:
    """Calibration of the probabilities nnU-Net saved in ``prediction_folder`` ({case}.npz + {case}.pkl, at the
    original image geometry) against ``reference_folder/{case}{file_ending}``. Writes the JSON and the reliability
    diagram when paths are given (atomically) and returns the JSON's content."""
    from nnunetv2.configuration import default_num_processes
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    plans_manager = PlansManager(plans)
    label_manager = plans_manager.get_label_manager(dataset_json)
    regions = label_manager.has_regions
    labels_or_regions = label_manager.foreground_regions if regions else label_manager.foreground_labels
    file_ending = dataset_json["file_ending"]
    cases = find_prediction_cases(prediction_folder, cases)
    missing = [c for c in cases if not (Path(reference_folder) / f"{c}{file_ending}").is_file()]
    if missing:
        raise FileNotFoundError(f"no reference for {', '.join(missing[:10])} in {reference_folder} (expected "
                                f"{{case}}{file_ending}).")
    reader_writer = plans_manager.image_reader_writer_class()
    args = [(str(Path(prediction_folder) / f"{c}.npz"), str(Path(prediction_folder) / f"{c}.pkl"),
             str(Path(reference_folder) / f"{c}{file_ending}"), reader_writer, labels_or_regions, regions,
             label_manager.ignore_label, n_bins) for c in cases]
    num_processes = min(num_processes or default_num_processes, len(args))
    if num_processes <= 1:
        per_case = [_calibrate_file(*a) for a in args]
    else:
        with multiprocessing.get_context("spawn").Pool(num_processes) as pool:
            per_case = pool.starmap(_calibrate_file, args)
    result = summarise(per_case, cases, [a[0] for a in args], [a[2] for a in args],
                       [label_key(k) for k in labels_or_regions], regions, n_bins)
    if output_json is not None:
        write_json_atomic(result, output_json)
    if output_png is not None:
        reliability_diagram(result, output_png)
    return result


def summarise(per_case: Sequence[dict[str, Any]], cases: Sequence[str], prediction_files: Sequence[str],
              reference_files: Sequence[str], keys: Sequence[str], regions: bool, n_bins: int = N_BINS
              ) -> dict[str, Any]:
    def pooled(get) -> CalibrationBins:
        total = CalibrationBins(n_bins)
        for c in per_case:
            total = total + get(c)
        return total

    def mean(get) -> float | None:
        values = [get(c).ece() for c in per_case]
        values = [v for v in values if np.isfinite(v)]
        return float(np.mean(values)) if values else None

    getters = {"all": lambda c: c["all"], "foreground": lambda c: c["foreground"]}
    class_getters = {k: (lambda c, k=k: c["classes"][k]) for k in keys}
    return {
        "n_bins": n_bins,
        "samples": "per voxel and region (sigmoid)" if regions else "per voxel (softmax)",
        "pooled": {**{name: pooled(g).summary(with_bins=True) for name, g in getters.items()},
                   "classes": {k: pooled(g).summary(with_bins=True) for k, g in class_getters.items()}},
        "mean": {**{name: mean(g) for name, g in getters.items()},
                 "classes": {k: mean(g) for k, g in class_getters.items()}},
        "metric_per_case": [
            {"case": case, "prediction_file": pf, "reference_file": rf,
             **{name: g(c).summary() for name, g in getters.items()},
             "classes": {k: g(c).summary() for k, g in class_getters.items()}}
            for case, pf, rf, c in zip(cases, prediction_files, reference_files, per_case)],
    }


# ---------------------------------------------------------------- output
def reliability_diagram(result: dict[str, Any], path: str | os.PathLike) -> None:
    """Reliability diagram of the pooled bins (foreground, then each class): per confidence bin, the accuracy
    (red) next to the mean confidence (blue), as in the MisMatch paper's figures; the diagonal is perfect
    calibration. Written atomically as a PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    panels = [("foreground", result["pooled"]["foreground"])] + \
        [(f"class {k}", v) for k, v in result["pooled"]["classes"].items()]
    fig = Figure(figsize=(4.2 * len(panels), 4.4))
    FigureCanvasAgg(fig)
    for i, (title, stats) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        bins = stats["bins"]
        lower, upper = np.array(bins["lower"]), np.array(bins["upper"])
        width = (upper - lower) / 2
        accuracy = np.array([np.nan if v is None else v for v in bins["accuracy"]], dtype=float)
        confidence = np.array([np.nan if v is None else v for v in bins["confidence"]], dtype=float)
        filled = np.array(bins["count"]) > 0
        ax.bar(lower[filled], confidence[filled], width=width[filled], align="edge", color="tab:blue",
               label="confidence")
        ax.bar(lower[filled] + width[filled], accuracy[filled], width=width[filled], align="edge", color="tab:red",
               label="accuracy")
        ax.plot([0, 1], [0, 1], color="black", linestyle="--", linewidth=1)
        ece = stats["ECE"]
        ax.set_title(f"{title}: ECE {'n/a' if ece is None else f'{ece:.4f}'}\n{stats['num_samples']} samples",
                     fontsize=10)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("confidence bin")
        if i == 0:
            ax.set_ylabel("accuracy / mean confidence")
            ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    replace_atomic(lambda tmp: fig.savefig(tmp, dpi=100, format="png"), path)


# ---------------------------------------------------------------- a trainer's final validation
def validation_calibration(validation_folder: str | os.PathLike, reference_folder: str | os.PathLike,
                           dataset_json: dict, plans: dict, cases: Sequence[str], keep_probabilities: bool,
                           created_probabilities: Iterable[str] = (), num_processes: int | None = None
                           ) -> dict[str, Any]:
    """Calibration of a trainer's final validation (``validation/calibration.json`` and
    ``validation/reliability_diagram.png``). The validation ran with probabilities saved; unless the user asked
    for them (``--npz``), the ``.npz``/``.pkl`` files named in ``created_probabilities`` are removed afterwards."""
    folder = Path(validation_folder)
    try:
        return calibration_on_folder(reference_folder, folder, dataset_json, plans, folder / JSON_NAME,
                                     folder / DIAGRAM_NAME, cases, num_processes)
    finally:
        if not keep_probabilities:
            for case in created_probabilities:
                for ext in (".npz", ".pkl"):
                    (folder / f"{case}{ext}").unlink(missing_ok=True)
