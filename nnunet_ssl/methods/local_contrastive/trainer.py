"""``LocalContrastiveTrainer``: local contrastive loss with pseudo-label based self-training (paper 004).

Schedule (section IV.D, see ``schedule.py``): first nnU-Net's training on the labeled patches only; then, at the
scheduled iterations, pseudo-labels for every unlabeled image from the current network (nnU-Net's sliding-window
predictor on the preprocessed image), stored in the fold folder. From then on each iteration puts the labeled batch
and a batch of pseudo-labeled patches (nnU-Net's augmentation, the pseudo-label as target) through the network in
one call, after random brightness and contrast changes: nnU-Net's Dice + CE with deep supervision on the labeled part
(the pseudo-labels never enter it) plus lambda_cont times the local contrastive loss (eq. 3-4) of the projection
head's embeddings on all patches (eq. 2).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, ClassVar

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager
from torch import distributed as dist
from torch import nn

from nnunet_ssl.data.loader import UnlabeledDataset
from nnunet_ssl.data.unlabeled import write_json_atomic
from nnunet_ssl.methods.local_contrastive.batch import (
    brightness_contrast,
    class_membership,
    keep_outside_label,
    outside_label,
    outside_mask,
    segmentation_target,
)
from nnunet_ssl.methods.local_contrastive.losses import (
    MATCHINGS,
    local_contrastive_loss,
    local_contrastive_objective,
    sample_anchors,
)
from nnunet_ssl.methods.local_contrastive.network import LocalContrastiveNetwork
from nnunet_ssl.methods.local_contrastive.schedule import PseudoLabelSchedule
from nnunet_ssl.training.base import SSL_HPARAMS, SemiSupervisedTrainer
from nnunet_ssl.training.hparams import HParam, HParamError
from nnunet_ssl.training.pseudo_labels import (
    PseudoLabeledDataset,
    PseudoLabelStore,
    predict_pseudo_labels,
    predict_pseudo_labels_with_agreement,
)
from nnunet_ssl.training.supervised import CUDA

PSEUDO_LABEL_FOLDER = "pseudo_labels"

LOCAL_CONTRASTIVE_HPARAMS: dict[str, HParam] = {
    **{k: v for k, v in SSL_HPARAMS.items() if k not in ("rampup", "rampup_fraction")},  # phases instead of a ramp
    "consistency_weight": HParam(0.1, float, "lambda_cont of eq. 2: weight of the local contrastive loss.", low=0.0),
    "matching": HParam("inter", str, "Class means of the pixel's own image (intra) or of every image of the batch "
                                     "(inter), section III.", choices=MATCHINGS),
    "temperature": HParam(0.1, float, "Temperature tau of eq. 4.", low=0.01, high=10.0),
    "samples_per_class": HParam(3, int, "|S~_c(x)|: pixels sampled per class and image for eq. 3.", low=1, high=4096),
    "include_background": HParam(False, bool, "Count the background as a class in eq. 3-4 (the paper uses the "
                                              "foreground classes; needed with a single foreground class)."),
    "supervised_fraction": HParam(0.25, float, "Share of all iterations trained on labeled images only before the "
                                               "first pseudo-labels (the paper: 5000 of 20000).", low=0.0, high=0.99),
    "pseudo_label_rounds": HParam(3, int, "Pseudo-labelling rounds (the paper: 3).", low=1),
    "refresh_every": HParam(None, int, "P: iterations between pseudo-label refreshes; null: the iterations after "
                                       "the supervised phase split evenly into the rounds.", low=1, optional=True),
    "filter_dice_threshold": HParam(0.0, float, "Table VII: use an unlabeled image only if the Dice between its "
                                                "predictions with and without mirroring exceeds this; 0: all.",
                                    low=0.0, high=1.0),
    "brightness": HParam(0.3, float, "Random brightness change x + U(-b, b) of the contrastive batch.",
                         low=0.0, high=10.0),
    "contrast": HParam(0.3, float, "Random contrast change: factor U(1 - c, 1 + c) around the mean.",
                       low=0.0, high=0.99),
}


class LocalContrastiveTrainer(SemiSupervisedTrainer):
    hparam_spec: ClassVar[dict[str, HParam]] = LOCAL_CONTRASTIVE_HPARAMS
    extra_log_keys: ClassVar[tuple[str, ...]] = ("loss_supervised", "loss_contrastive", "contrastive_weight")

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = CUDA):
        super().__init__(plans, configuration, fold, dataset_json, device)
        lm = self.label_manager
        self.outside_value = outside_label(lm.foreground_labels, lm.ignore_label)
        self.pseudo_label_round = 0  # pseudo-labelling rounds done; 0: the supervised phase
        self.pseudo_label_cases: list[str] = []  # the cases of the current round (all, or those kept by the filter)
        self._target_unlabeled: torch.Tensor | None = None

    def _apply_hparams(self) -> None:
        super()._apply_hparams()
        lm, h = self.label_manager, self.hparams
        n_classes = len(lm.foreground_regions if lm.has_regions else lm.foreground_labels)
        if n_classes + int(h["include_background"]) < 2:
            raise HParamError(f"{type(self).__name__}: this dataset has a single foreground "
                              f"{'region' if lm.has_regions else 'label'}, so eq. 4 would have no negative class and "
                              f"the contrastive loss would be 0. Set include_background to true in "
                              f"nnUNet_ssl_hparams to contrast it with the background.")
        self.schedule = PseudoLabelSchedule.from_hparams(h, type(self).__name__)

    @staticmethod
    def build_network_architecture(plans_manager: PlansManager, configuration_manager: ConfigurationManager,
                                   num_input_channels: int, num_output_channels: int,
                                   enable_deep_supervision: bool = True) -> nn.Module:
        return LocalContrastiveNetwork(nnUNetTrainer.build_network_architecture(
            plans_manager, configuration_manager, num_input_channels, num_output_channels, enable_deep_supervision))

    def get_training_transforms(self, patch_size, rotation_for_DA, deep_supervision_scales, mirror_axes,
                                do_dummy_2d_data_aug, use_mask_for_norm=None, is_cascaded=False,
                                foreground_labels=None, regions=None, ignore_label=None):
        """nnU-Net's pipeline, with voxels outside the nonzero mask marked (see ``batch.keep_outside_label``)."""
        transforms = super().get_training_transforms(
            patch_size, rotation_for_DA, deep_supervision_scales, mirror_axes, do_dummy_2d_data_aug,
            use_mask_for_norm=use_mask_for_norm, is_cascaded=is_cascaded, foreground_labels=foreground_labels,
            regions=regions, ignore_label=ignore_label)
        return keep_outside_label(transforms, outside_label(foreground_labels, ignore_label), regions is not None)

    # ---------------------------------------------------------------- pseudo-labels
    def pseudo_label_store(self, round_number: int | None = None) -> PseudoLabelStore:
        """Round r's pseudo-labels: ``<fold folder>/pseudo_labels/round_<r>/``. Every round keeps its own folder, so a
        resumed run (whose checkpoint may predate the last refresh) reads the labels its checkpoint refers to."""
        r = self.pseudo_label_round if round_number is None else round_number
        return PseudoLabelStore(Path(self.output_folder) / PSEUDO_LABEL_FOLDER / f"round_{r}")

    def unlabeled_dataset(self) -> PseudoLabeledDataset:
        return PseudoLabeledDataset(self.unlabeled_folder(), self.pseudo_label_store(), self.pseudo_label_cases)

    def _images(self) -> UnlabeledDataset:
        return UnlabeledDataset(str(self.unlabeled_folder()), self.unlabeled_identifiers)

    def get_unlabeled_dataloader(self):
        """None in the supervised phase (no unlabeled patches are drawn); afterwards the pseudo-labeled cases of the
        current round (re-predicted first if some are missing, e.g. a fold folder copied without them)."""
        if self.pseudo_label_round == 0 or not self.pseudo_label_cases:
            return None
        store = self.pseudo_label_store()
        missing = [c for c in self.pseudo_label_cases if not store.has(c)]
        if self.is_ddp:
            dist.barrier()  # every rank decided on the same files before any rank writes
        if missing:
            self.print_to_log_file(f"{len(missing)} pseudo-label(s) of round {self.pseudo_label_round} missing in "
                                   f"{store.folder}; predicting them with the current network.")
            predict_pseudo_labels(self, self._images(), missing, store)
            if self.is_ddp:
                dist.barrier()
        return super().get_unlabeled_dataloader()

    def refresh_pseudo_labels(self) -> None:
        """One pseudo-labelling step of section IV.D: predict every unlabeled case with the current network, keep
        those that pass the optional Table VII filter, and restart the unlabeled loader on them."""
        r, step = self.pseudo_label_round + 1, self.global_step
        store, cases = self.pseudo_label_store(r), list(self.unlabeled_identifiers)
        threshold = self.hparams["filter_dice_threshold"]
        start = time.perf_counter()
        agreement = None
        if threshold > 0:
            agreement = predict_pseudo_labels_with_agreement(self, self._images(), cases, store)
            if self.is_ddp:
                gathered = [None] * dist.get_world_size()
                dist.all_gather_object(gathered, agreement)
                agreement = {k: v for part in gathered for k, v in part.items()}
            kept = [c for c in cases if agreement[c] > threshold]
        else:
            predict_pseudo_labels(self, self._images(), cases, store)
            kept = cases
        if self.is_ddp:
            dist.barrier()
        seconds = time.perf_counter() - start
        if self.local_rank == 0:
            store.folder.mkdir(parents=True, exist_ok=True)
            write_json_atomic({"round": r, "iteration": step, "filter_dice_threshold": threshold,
                               "agreement_dice": agreement, "cases": kept}, store.folder / "selection.json")
        self.pseudo_label_round, self.pseudo_label_cases = r, kept
        self.print_to_log_file(
            f"Pseudo-labels round {r}/{self.schedule.rounds} at iteration {step}: {len(cases)} case(s) in "
            f"{seconds:.1f} s ({seconds / max(1, len(cases)):.2f} s per case), {len(kept)} used"
            + (f" (agreement Dice > {threshold})" if threshold > 0 else "") + f", in {store.folder}")
        self.restart_unlabeled_dataloader()

    def next_unlabeled_batch(self) -> dict:
        if self.dataloader_unlabeled is None:
            self._target_unlabeled = None
            return {"data": torch.empty(0)}
        batch = super().next_unlabeled_batch()
        self._target_unlabeled = batch["target"]
        return batch

    def train_step(self, batch: dict) -> dict:
        while self.schedule.due(self.pseudo_label_round, self.global_step):
            self.refresh_pseudo_labels()
        return super().train_step(batch)

    # ---------------------------------------------------------------- the losses
    def compute_losses(self, data, target, data_unlabeled):
        h, lm = self.hparams, self.label_manager
        regions = lm.has_regions
        targets = target if isinstance(target, list) else [target]
        seg_targets = [segmentation_target(t, self.outside_value, regions) for t in targets]
        seg_target = seg_targets if isinstance(target, list) else seg_targets[0]

        if self.pseudo_label_round == 0:
            # first phase: nnU-Net's forward and loss on the labeled patches. h_phi is not trained yet; a zero term
            # gives its parameters a (zero) gradient, as DDP expects one for every parameter.
            supervised = self.loss(self.network(data), seg_target)
            zero = sum(p.sum() for p in self.unwrapped_network().projection_head.parameters()) * 0.0
            return {"loss": supervised + zero, "loss_supervised": supervised,
                    "loss_contrastive": zero.detach(), "contrastive_weight": torch.tensor(0.0)}

        n_l, full = data.shape[0], targets[0]
        if data_unlabeled.numel() and self._target_unlabeled is not None:
            data = torch.cat((data, data_unlabeled))
            full = torch.cat((full, self._target_unlabeled.to(self.device, non_blocking=True)))
        output, embeddings = self.network(self.contrastive_input(data, full), return_embeddings=True)
        labeled = [o[:n_l] for o in output] if isinstance(output, (list, tuple)) else output[:n_l]
        supervised = self.loss(labeled, seg_target)  # labeled patches only: no pseudo-label in L_seg

        membership = class_membership(full, lm, self.outside_value, h["include_background"])
        anchors, valid = sample_anchors(membership, h["samples_per_class"])
        contrastive = local_contrastive_loss(embeddings, membership, anchors, valid, h["temperature"], h["matching"])
        weight = h["consistency_weight"]
        return {"loss": local_contrastive_objective(supervised, contrastive, weight), "loss_supervised": supervised,
                "loss_contrastive": contrastive, "contrastive_weight": torch.tensor(weight)}

    def contrastive_input(self, data: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The batch after random brightness and contrast changes (section IV.E). Channels that nnU-Net normalises
        inside the nonzero mask only are 0 outside it after its augmentation; they stay so."""
        x = brightness_contrast(data, self.hparams["brightness"], self.hparams["contrast"])
        masked = self.configuration_manager.use_mask_for_norm
        if masked and any(masked):
            outside = outside_mask(target, self.outside_value, self.label_manager.has_regions)
            channels = torch.as_tensor(masked, device=x.device).view(1, -1, *[1] * (x.ndim - 2))
            x = x.masked_fill(outside & channels, 0.0)
        return x

    # ---------------------------------------------------------------- state
    def extra_checkpoint_state(self) -> dict[str, Any]:
        return {**super().extra_checkpoint_state(), "pseudo_label_round": self.pseudo_label_round,
                "pseudo_label_cases": list(self.pseudo_label_cases)}

    def load_extra_checkpoint_state(self, state: dict[str, Any]) -> None:
        super().load_extra_checkpoint_state(state)
        self.pseudo_label_round = int(state.get("pseudo_label_round", 0))
        self.pseudo_label_cases = list(state.get("pseudo_label_cases", []))
