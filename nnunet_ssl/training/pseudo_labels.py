"""Pseudo-labels of preprocessed images, predicted with nnU-Net's own sliding-window predictor.

Methods that self-train (POPCORN, local contrastive self-training) predict label maps for unlabeled cases with
the current model and train on them later. Shared here:

- ``predict_logits``: nnU-Net's ``nnUNetPredictor.predict_sliding_window_return_logits`` on a preprocessed case
  (the same code path as nnU-Net's final validation: Gaussian-weighted tiles with step 0.5, optional mirroring),
  with the training network switched to inference mode and back;
- ``segmentation_from_logits``: the label map nnU-Net would export (argmax, or regions thresholded at 0.5 and
  mapped back with ``regions_class_order``), at the preprocessed resolution, with -1 outside the nonzero mask
  exactly like nnU-Net's preprocessed ``_seg`` arrays;
- ``sliding_window_tiles``: the tiles nnU-Net's sliding-window prediction feeds the network (same padding, same
  slicers), for methods that need per-tile network outputs other than logits (e.g. encoder features);
- ``PseudoLabelStore``: a folder of ``{case}_seg.b2nd`` + ``{case}.pkl`` (the image's properties with
  ``class_locations`` sampled from the pseudo-label, so nnU-Net's foreground oversampling works), each file written
  to a temporary name and renamed;
- ``PseudoLabeledDataset`` (unlabeled images with their pseudo-labels) and ``CombinedDataset`` (labeled cases plus
  pseudo-labeled ones), which nnU-Net's data loader reads like its own dataset;
- agreement of two predictions for pseudo-label filters: ``predict_logits_mirrored`` (the same sliding window on the
  image mirrored along the inference mirroring axes, mirrored back), ``segmentation_dice`` (mean Dice of two label
  maps over labels or regions) and ``predict_pseudo_labels_with_agreement``;
- ``label_shares`` and ``underrepresented_labels``: each label's share of the annotated voxels, to compare
  pseudo-labels with the labeled cases (a class the model has not learned yet is missing from its pseudo-labels);
- ``label_share_bias``: per-label logit offsets that give a prediction the labeled cases' shares of the
  foreground labels (distribution alignment), for pseudo-labels of images unlike the labeled ones.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import blosc2
import numpy as np
import torch
from acvl_utils.cropping_and_padding.padding import pad_nd_image
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
from nnunetv2.preprocessing.preprocessors.default_preprocessor import DefaultPreprocessor
from nnunetv2.training.dataloading.nnunet_dataset import nnUNetBaseDataset, nnUNetDatasetBlosc2
from nnunetv2.utilities.label_handling.label_handling import LabelManager

from nnunet_ssl.data.unlabeled import replace_atomic as _replace_atomic  # a module name tests patch

SEG_SUFFIX = "_seg.b2nd"
PROPERTIES_SUFFIX = ".pkl"


# ---------------------------------------------------------------- prediction
def inference_network(trainer) -> torch.nn.Module:
    """The trainer's network without the DDP wrapper: ranks predict different cases, and a DDP forward would wait
    for the other ranks (buffer broadcast). A compiled network stays compiled."""
    return trainer.network.module if trainer.is_ddp else trainer.network


@contextmanager
def inference_mode(trainer):
    """Eval mode without deep supervision for the duration; training mode and deep supervision restored after."""
    network = inference_network(trainer)
    was_training = network.training
    trainer.set_deep_supervision_enabled(False)
    network.eval()
    try:
        with torch.no_grad():
            yield network
    finally:
        trainer.set_deep_supervision_enabled(trainer.enable_deep_supervision)
        network.train(was_training)


def make_predictor(trainer, network: torch.nn.Module, use_mirroring: bool = False,
                   tile_step_size: float = 0.5) -> nnUNetPredictor:
    """nnU-Net's predictor around the training network, configured as for nnU-Net's final validation."""
    predictor = nnUNetPredictor(tile_step_size=tile_step_size, use_gaussian=True, use_mirroring=use_mirroring,
                                perform_everything_on_device=True, device=trainer.device, verbose=False,
                                verbose_preprocessing=False, allow_tqdm=False)
    predictor.manual_initialization(network, trainer.plans_manager, trainer.configuration_manager, None,
                                    trainer.dataset_json, type(trainer).__name__,
                                    trainer.inference_allowed_mirroring_axes)
    return predictor


def predict_logits(predictor: nnUNetPredictor, data: np.ndarray) -> torch.Tensor:
    """Sliding-window logits (C, *spatial) of a preprocessed case (C_in, *spatial), on the CPU in fp32."""
    image = torch.from_numpy(np.ascontiguousarray(data[:], dtype=np.float32))
    return predictor.predict_sliding_window_return_logits(image).float().cpu()


def sliding_window_tiles(predictor: nnUNetPredictor, image: torch.Tensor, batch_size: int = 1) \
        -> Iterator[torch.Tensor]:
    """The tiles that ``predictor.predict_sliding_window_return_logits`` feeds the network for ``image``
    (C, *spatial), in its order, stacked ``batch_size`` at a time (the last batch may be smaller): the image
    zero-padded to at least the patch size with ``pad_nd_image`` and cut with the predictor's
    ``_internal_get_sliding_window_slicers`` (its ``tile_step_size``; 2d configurations slice 3d images). Tiles are
    on the image's device; no mirroring."""
    data, _ = pad_nd_image(image, predictor.configuration_manager.patch_size, "constant", {"value": 0}, True, None)
    slicers = predictor._internal_get_sliding_window_slicers(data.shape[1:])
    for start in range(0, len(slicers), batch_size):
        yield torch.stack([data[s] for s in slicers[start:start + batch_size]])


def predict_logits_mirrored(predictor: nnUNetPredictor, data: np.ndarray, mirror_axes: Sequence[int]) -> torch.Tensor:
    """Sliding-window logits of the case mirrored along ``mirror_axes`` (axes of the network's patch, as in
    ``inference_allowed_mirroring_axes``), mirrored back: a second view of the case, e.g. for a consistency filter.
    For a 2d configuration the patch axes are the last two of the (C_in, z, y, x) case."""
    if not mirror_axes:
        raise ValueError("predict_logits_mirrored needs at least one mirroring axis")
    offset = data.ndim - len(predictor.configuration_manager.patch_size)  # channel axis (+ slice axis for 2d)
    axes = tuple(a + offset for a in mirror_axes)
    image = torch.from_numpy(np.ascontiguousarray(data[:], dtype=np.float32)).flip(axes)
    return predictor.predict_sliding_window_return_logits(image).float().cpu().flip(axes)


def segmentation_dice(seg_a: np.ndarray, seg_b: np.ndarray, label_manager: LabelManager) -> float:
    """Mean Dice of two label maps in the preprocessed ``_seg`` convention over the foreground labels (or regions),
    counting only voxels inside the nonzero mask of both (>= 0). A label or region absent from both maps is left out
    of the mean; 1.0 when every one is absent from both (the maps agree)."""
    a, b = np.asarray(seg_a), np.asarray(seg_b)
    inside = (a >= 0) & (b >= 0)
    classes = label_manager.foreground_regions if label_manager.has_regions else label_manager.foreground_labels
    dices = []
    for c in classes:
        labels = list(c) if isinstance(c, (list, tuple)) else [c]
        in_a, in_b = np.isin(a, labels) & inside, np.isin(b, labels) & inside
        total = int(in_a.sum()) + int(in_b.sum())
        if total:
            dices.append(2.0 * int((in_a & in_b).sum()) / total)
    return float(np.mean(dices)) if dices else 1.0


def segmentation_from_logits(logits: torch.Tensor, label_manager: LabelManager,
                             nonzero_seg: np.ndarray | None = None) -> np.ndarray:
    """Label map (1, *spatial) in nnU-Net's preprocessed ``_seg`` convention: label values (regions mapped back
    with ``regions_class_order``), and -1 where ``nonzero_seg`` (the case's preprocessed ``_seg``) is -1."""
    seg = label_manager.convert_logits_to_segmentation(logits)
    seg = seg.numpy() if isinstance(seg, torch.Tensor) else seg
    seg = seg.astype(np.int16 if seg.max(initial=0) > 127 else np.int8)[None]
    if nonzero_seg is not None:
        seg[np.asarray(nonzero_seg[:]) < 0] = -1
    return seg


def class_locations(seg: np.ndarray, label_manager: LabelManager) -> dict:
    """Voxel samples per class (or region) exactly as nnU-Net's preprocessing collects them for oversampling,
    including the 'annotated' key nnU-Net's loader needs on datasets with an ignore label."""
    collect = list(label_manager.foreground_regions if label_manager.has_regions else label_manager.foreground_labels)
    if label_manager.has_ignore_label:
        collect.append([-1] + label_manager.all_labels)
    return DefaultPreprocessor._sample_foreground_locations(seg, collect)


# ---------------------------------------------------------------- label shares
def label_shares(segs: Iterable[np.ndarray], labels: Sequence[int], ignore_label: int | None = None) -> dict[int, float]:
    """Share of each of ``labels`` among the annotated voxels of all ``segs`` together: voxels >= 0 (-1 is outside
    nnU-Net's nonzero mask) that do not carry ``ignore_label``. 0 for every label when nothing is annotated."""
    counts = np.zeros(max([*labels, 0]) + 1, dtype=np.int64)
    annotated = 0
    for seg in segs:
        values = np.asarray(seg[:]).ravel()
        values = values[(values >= 0) & (values != (-1 if ignore_label is None else ignore_label))]
        annotated += values.size
        counts += np.bincount(values[values < counts.size].astype(np.int64), minlength=counts.size)
    return {int(v): float(counts[v] / annotated) if annotated else 0.0 for v in labels}


def underrepresented_labels(reference: dict[int, float], shares: dict[int, float], ratio: float = 0.5) -> list[int]:
    """Labels present in ``reference`` whose share in ``shares`` is below ``ratio`` times their reference share."""
    return [v for v, r in reference.items() if r > 0 and shares.get(v, 0.0) < ratio * r]


def label_share_bias(logits: torch.Tensor, target: dict[int, float], mask: torch.Tensor | np.ndarray | None = None,
                     iterations: int = 50, tolerance: float = 0.01) -> torch.Tensor:
    """Offsets (C,) to add to ``logits`` (C, *spatial; channel c is label c, no regions) so that each label of
    ``target`` with a positive share takes that share (``target`` renormalised over those labels) of the voxels the
    argmax gives one of those labels; other channels keep offset 0.

    Distribution alignment (Berthelot et al., ReMixMatch, ICLR 2020) scales a prediction's class
    probabilities by the ratio of the labeled class marginal to the predicted one, an additive offset on
    log-probabilities; here that offset is fitted to the hard label map's shares, which a pseudo-label is. The
    shares are matched among foreground voxels only and the offsets of the aligned labels sum to zero, so the
    background decision moves little: the field of view fixes how much background an image has, not the
    labeled cases. Fixed-point iteration, each step half the log ratio of target to current share, until every
    share is within ``tolerance`` (relative) of its target or after ``iterations`` steps. ``mask`` (spatial,
    bool): the voxels counted (e.g. nnU-Net's nonzero mask); no offset when none of them is foreground."""
    labels = [v for v, share in sorted(target.items()) if share > 0]
    bias = torch.zeros(logits.shape[0], dtype=torch.float32, device=logits.device)
    if len(labels) < 2:  # one foreground label has all of the foreground: nothing to align
        return bias
    flat = logits.detach().reshape(logits.shape[0], -1).float()
    if mask is not None:
        flat = flat[:, torch.as_tensor(np.asarray(mask), device=logits.device).reshape(-1).bool()]
    index = torch.tensor(labels, device=logits.device)
    goal = torch.tensor([target[v] for v in labels], dtype=torch.float32, device=logits.device)
    goal = goal / goal.sum()
    for _ in range(iterations):
        counts = torch.bincount((flat + bias[:, None]).argmax(0), minlength=logits.shape[0])[index].float()
        if counts.sum() == 0:
            break
        ratio = goal.log() - (counts / counts.sum()).clamp_min(1e-6).log()
        if ratio.abs().max() <= np.log1p(tolerance):
            break
        bias[index] += 0.5 * (ratio - ratio.mean())
    return bias


# ---------------------------------------------------------------- storage
class PseudoLabelStore:
    """A folder of pseudo-label maps at the preprocessed resolution. ``{case}.pkl`` is written last: a case counts
    as stored once both files exist (a run killed in between re-predicts that case)."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)

    def seg_file(self, case: str) -> Path:
        return self.folder / f"{case}{SEG_SUFFIX}"

    def properties_file(self, case: str) -> Path:
        return self.folder / f"{case}{PROPERTIES_SUFFIX}"

    def has(self, case: str) -> bool:
        return self.seg_file(case).is_file() and self.properties_file(case).is_file()

    def cases(self) -> list[str]:
        return sorted(p.name[: -len(PROPERTIES_SUFFIX)] for p in self.folder.glob(f"*{PROPERTIES_SUFFIX}")
                      if self.seg_file(p.name[: -len(PROPERTIES_SUFFIX)]).is_file())

    def write(self, case: str, seg: np.ndarray, image_properties: dict, label_manager: LabelManager) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        properties = dict(image_properties)
        properties["class_locations"] = class_locations(seg, label_manager)

        def write_seg(tmp: str) -> None:
            os.remove(tmp)  # blosc2 refuses to overwrite
            blosc2.asarray(np.ascontiguousarray(seg), urlpath=tmp, mode="w")

        def write_properties(tmp: str) -> None:
            with open(tmp, "wb") as f:
                pickle.dump(properties, f)

        _replace_atomic(write_seg, self.seg_file(case))
        _replace_atomic(write_properties, self.properties_file(case))

    def load(self, case: str):
        seg = blosc2.open(urlpath=str(self.seg_file(case)), mode="r", dparams={"nthreads": 1})
        with open(self.properties_file(case), "rb") as f:
            return seg, pickle.load(f)


def predict_pseudo_labels(trainer, image_dataset: nnUNetDatasetBlosc2, cases: Sequence[str],
                          store: PseudoLabelStore, use_mirroring: bool = False,
                          align_to: dict[int, float] | None = None) -> dict[str, dict]:
    """Predict and store the pseudo-label of each case of ``image_dataset`` (its ``_seg`` is the nonzero mask).
    ``align_to`` (foreground label -> share, e.g. the labeled cases' ``label_shares``; not for regions): each case's
    logits get its ``label_share_bias`` inside the nonzero mask first; returns per case the ``offsets`` and, of the
    label map before them, the ``annotated`` voxels and the ``counts`` of the labels of ``align_to`` (what the
    model predicted, for checks that the alignment would hide); empty without ``align_to``. Under DDP each rank
    predicts (and returns) every world-size-th case; callers synchronise afterwards."""
    lm = trainer.label_manager
    if align_to is not None and lm.has_regions:
        raise ValueError("label-share alignment needs mutually exclusive labels; region-based labels overlap")
    rank, world = (trainer.local_rank, torch.distributed.get_world_size()) if trainer.is_ddp else (0, 1)
    aligned = {}
    with inference_mode(trainer) as network:
        predictor = make_predictor(trainer, network, use_mirroring)
        for case in list(cases)[rank::world]:
            data, nonzero_seg, _, properties = image_dataset.load_case(case)
            logits = predict_logits(predictor, data)
            if align_to is not None:
                inside = np.asarray(nonzero_seg[:])[0] >= 0
                unaligned = segmentation_from_logits(logits, lm, nonzero_seg)
                bias = label_share_bias(logits, align_to, inside)
                logits = logits + bias.to(logits.device).view(-1, *([1] * (logits.ndim - 1)))
                aligned[case] = {"offsets": [round(float(b), 4) for b in bias], "annotated": int(inside.sum()),
                                 "counts": {v: int((unaligned == v).sum()) for v in align_to}}
            store.write(case, segmentation_from_logits(logits, lm, nonzero_seg), properties, lm)
    return aligned


def predict_pseudo_labels_with_agreement(trainer, image_dataset: nnUNetDatasetBlosc2, cases: Sequence[str],
                                         store: PseudoLabelStore) -> dict[str, float]:
    """``predict_pseudo_labels`` without mirroring, plus a second prediction of each case mirrored along all of the
    trainer's ``inference_allowed_mirroring_axes``; returns the ``segmentation_dice`` of the two label maps per case
    (the stored pseudo-label is the unmirrored one). Under DDP each rank handles (and returns) every world-size-th
    case; callers gather the results and synchronise."""
    axes = tuple(trainer.inference_allowed_mirroring_axes or ())
    if not axes:
        raise ValueError(f"{type(trainer).__name__}: a mirrored second prediction needs inference mirroring axes, but "
                         f"this configuration allows none")
    lm = trainer.label_manager
    rank, world = (trainer.local_rank, torch.distributed.get_world_size()) if trainer.is_ddp else (0, 1)
    agreement = {}
    with inference_mode(trainer) as network:
        predictor = make_predictor(trainer, network, use_mirroring=False)
        for case in list(cases)[rank::world]:
            data, nonzero_seg, _, properties = image_dataset.load_case(case)
            seg = segmentation_from_logits(predict_logits(predictor, data), lm, nonzero_seg)
            mirrored = segmentation_from_logits(predict_logits_mirrored(predictor, data, axes), lm, nonzero_seg)
            agreement[case] = segmentation_dice(seg, mirrored, lm)
            store.write(case, seg, properties, lm)
    return agreement


# ---------------------------------------------------------------- datasets for nnU-Net's data loader
class PseudoLabeledDataset(nnUNetDatasetBlosc2):
    """Images of ``image_folder`` (the unlabeled preprocessed folder) with the label maps of ``store``."""

    def __init__(self, image_folder: str | Path, store: PseudoLabelStore, identifiers: Iterable[str]):
        super().__init__(str(image_folder), list(identifiers))
        self.store = store

    def load_case(self, identifier: str):
        data = blosc2.open(urlpath=os.path.join(self.source_folder, identifier + ".b2nd"), mode="r",
                           dparams={"nthreads": 1}, **self.mmap_kwargs)
        seg, properties = self.store.load(identifier)
        return data, seg, None, properties


class CombinedDataset:
    """The union of datasets with disjoint identifiers (e.g. labeled cases and pseudo-labeled ones), read by
    nnU-Net's data loader like one dataset (it uses ``identifiers`` and ``load_case``); each case is loaded by the
    dataset that holds it."""

    def __init__(self, datasets: Sequence[nnUNetBaseDataset]):
        self.datasets = list(datasets)
        self.owner: dict[str, nnUNetBaseDataset] = {}
        for ds in self.datasets:
            for identifier in ds.identifiers:
                if identifier in self.owner:
                    raise ValueError(f"case '{identifier}' is in more than one dataset")
                self.owner[identifier] = ds
        self.identifiers = sorted(self.owner)

    def load_case(self, identifier: str):
        return self.owner[identifier].load_case(identifier)

    def __getitem__(self, identifier: str):
        return self.load_case(identifier)
