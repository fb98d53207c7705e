"""``SemiSupervisedTrainer``: the loop every semi-supervised method shares.

Per iteration (``SupervisedTrainer.train_step``): the labeled batch from nnU-Net's loader, an unlabeled batch from
a second loader (same augmentation pipeline and patch size, its own batch size), the method's losses from
``compute_losses``, then one backward and one optimizer step (with nnU-Net's gradient clipping and, on CUDA, mixed
precision), then ``after_optimizer_step`` (e.g. an EMA teacher update). A method subclass says which network
(``build_network_architecture``) and which losses; it leaves the loop alone.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from batchgenerators.dataloading.nondet_multi_threaded_augmenter import NonDetMultiThreadedAugmenter
from batchgenerators.dataloading.single_threaded_augmenter import SingleThreadedAugmenter
from nnunetv2.configuration import default_num_processes
from nnunetv2.paths import nnUNet_raw
from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
from nnunetv2.utilities.default_n_proc_DA import get_allowed_n_proc_DA
from torch import distributed as dist

from nnunet_ssl.data.loader import UnlabeledDataLoader, UnlabeledDataset
from nnunet_ssl.data.unlabeled import (
    UNLABELED_FOLDER,
    UnlabeledDataError,
    gather_unlabeled_cases,
    preprocess_unlabeled,
    unlabeled_preprocessed_folder,
)
from nnunet_ssl.training.distribution import ForegroundShares
from nnunet_ssl.training.hparams import HParam, HParamError
from nnunet_ssl.training.pseudo_labels import label_shares
from nnunet_ssl.training.ramps import RAMPS, rampup
from nnunet_ssl.training.supervised import CUDA, SCHEDULE_HPARAMS, SupervisedTrainer

UNLABELED_HPARAMS: dict[str, HParam] = {  # every trainer that reads unlabeled images
    **SCHEDULE_HPARAMS,
    "skip_bad_unlabeled": HParam(False, bool, "Leave bad unlabeled cases out (listed in the training log) instead "
                                              "of stopping before training."),
}
SSL_HPARAMS: dict[str, HParam] = {  # ... and draws unlabeled batches with a ramped unsupervised weight
    **UNLABELED_HPARAMS,
    "unlabeled_batch_size": HParam(None, int, "Unlabeled patches per iteration (per GPU); null: the labeled batch "
                                              "size.", low=1, optional=True),
    "consistency_weight": HParam(1.0, float, "Maximum weight of the unsupervised loss, reached after the ramp-up.",
                                 low=0.0),
    "rampup": HParam("sigmoid", str, "Shape of the ramp-up of the unsupervised weight.", choices=RAMPS),
    "rampup_fraction": HParam(0.25, float, "Fraction of all training iterations over which the weight ramps up "
                                           "from 0.", low=0.0, high=1.0),
}
# for methods whose consistency targets on unlabeled patches are the model's own soft predictions
TARGET_ALIGNMENT_HPARAM = HParam(
    False, bool, "Not in the papers: align the consistency targets on unlabeled patches to the labeled cases' label "
                 "shares: each voxel keeps its foreground probability, split among the foreground labels in "
                 "proportion to p_c times the labeled cases' share of label c over the model's running share (last "
                 "128 batches) (ReMixMatch's distribution alignment); not for region-based labels.")


class SemiSupervisedTrainer(SupervisedTrainer):
    hparam_spec: ClassVar[dict[str, HParam]] = SSL_HPARAMS
    # False for methods that train on labeled (and pseudo-labeled) batches only: no unlabeled loader is built and
    # ``compute_losses`` gets ``data_unlabeled=None``; the unlabeled images are still checked and preprocessed.
    draws_unlabeled_batches: ClassVar[bool] = True
    # The hyper-parameters that weight the method's unsupervised losses. All set to 0 they make its placebo: the same
    # training (network, loaders, unlabeled batches, random streams) with no loss reading an unlabeled image, the
    # control that tells a gain from the unlabeled data apart from one of the method's other changes
    # (``nnunet_ssl benchmark --placebo``). Empty for a method whose unlabeled images enter otherwise.
    unsupervised_weights: ClassVar[tuple[str, ...]] = ("consistency_weight",)

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = CUDA):
        super().__init__(plans, configuration, fold, dataset_json, device)
        if self.is_cascaded:
            raise ValueError(f"{type(self).__name__} does not support the cascade ('{configuration}' needs predictions "
                             f"of a previous stage, which unlabeled images do not have). Use 2d, 3d_fullres or "
                             f"3d_lowres.")
        self.unlabeled_identifiers: list[str] = []
        self.dataloader_unlabeled = None
        self._labeled_shares: dict[int, float] | None = None
        self._shares: ForegroundShares | None = None
        if self.hparams.get("target_alignment") and self.label_manager.has_regions:
            raise HParamError("target_alignment = true needs mutually exclusive labels, but this dataset's labels are "
                              "regions (they overlap); set it to false in nnUNet_ssl_hparams.")

    @classmethod
    def placebo_hparams(cls) -> dict[str, float] | None:
        """Hyper-parameters that turn the method into its placebo (``unsupervised_weights`` at 0); None if it has
        none."""
        return {name: 0.0 for name in cls.unsupervised_weights} or None

    # ---------------------------------------------------------------- schedule
    def unsupervised_weight(self) -> float:
        total = self.num_epochs * self.num_iterations_per_epoch
        length = round(self.hparams["rampup_fraction"] * total)
        return self.hparams["consistency_weight"] * rampup(self.hparams["rampup"], self.global_step, length)

    # ---------------------------------------------------------------- unlabeled data
    def unlabeled_folder(self):
        return unlabeled_preprocessed_folder(self.preprocessed_dataset_folder_base,
                                             self.configuration_manager.data_identifier)

    def prepare_unlabeled_data(self) -> list[str]:
        """Check the unlabeled images (and the labeled-fraction file) and preprocess what is missing or stale.
        Runs before any data loader or training step, so bad input fails first."""
        if not nnUNet_raw.is_set():
            raise UnlabeledDataError(f"{type(self).__name__} reads unlabeled images from the raw dataset folder, but "
                                     f"nnUNet_raw is not set. Export nnUNet_raw as for nnUNetv2_plan_and_preprocess.")
        raw = f"{nnUNet_raw.get()}/{self.plans_manager.dataset_name}"
        tr_keys, _ = self.do_split()
        skip_bad = self.hparams["skip_bad_unlabeled"]
        cases = gather_unlabeled_cases(raw, self.dataset_json, self.declared_unlabeled, skip_bad,
                                       self.print_to_log_file)
        if not cases:
            raise UnlabeledDataError(
                f"{type(self).__name__} needs unlabeled images but found none: put them in {raw}/{UNLABELED_FOLDER}/ "
                f"named like imagesTr ({{case}}_{{channel:04d}}{self.dataset_json['file_ending']}), or declare labeled "
                f"training cases as unlabeled (see `nnunet_ssl labeled-fraction -h`).")
        ready = [None]
        if self.local_rank == 0:
            ready[0] = preprocess_unlabeled(cases, self.unlabeled_folder(), self.plans_manager,
                                            self.configuration_name, self.dataset_json, default_num_processes,
                                            skip_bad=skip_bad, report=self.print_to_log_file)
        if self.is_ddp:  # every rank trains on the cases rank 0 preprocessed
            dist.broadcast_object_list(ready, src=0)
        if not ready[0]:
            raise UnlabeledDataError(f"every unlabeled case was left out as bad (see above); fix them or add "
                                     f"others to {raw}/{UNLABELED_FOLDER}/.")
        self.print_to_log_file(f"{len(ready[0])} unlabeled case(s) ({len(self.declared_unlabeled)} declared from "
                               f"imagesTr), {len(tr_keys)} labeled training case(s).")
        return ready[0]

    def labeled_images(self):
        """The labeled training cases of this fold, preprocessed (nnU-Net's dataset class)."""
        dataset_class = self.dataset_class or infer_dataset_class(self.preprocessed_dataset_folder)
        return dataset_class(self.preprocessed_dataset_folder, self.do_split()[0])

    def foreground_labels(self) -> list[int]:
        lm = self.label_manager
        return [v for v in lm.all_labels if v != 0 and v != lm.ignore_label]

    def labeled_shares(self) -> dict[int, float]:
        """Each foreground label's share of the annotated voxels of the labeled training cases (computed once)."""
        if self._labeled_shares is None:
            labeled = self.labeled_images()
            self._labeled_shares = label_shares((labeled.load_case(c)[1] for c in self.do_split()[0]),
                                                self.foreground_labels(), self.label_manager.ignore_label)
        return self._labeled_shares

    # ---------------------------------------------------------------- target alignment
    def foreground_shares(self) -> ForegroundShares:
        """``target_alignment``'s running shares, against the labeled cases' shares (label c is channel c)."""
        if self._shares is None:
            labeled = self.labeled_shares()
            self._shares = ForegroundShares([labeled[v] for v in self.foreground_labels()])
        return self._shares

    def update_alignment(self, unlabeled_probs: torch.Tensor) -> torch.Tensor:
        """``target_alignment``: the running shares updated with this batch's softmax probabilities on the
        unlabeled patches (what the targets come from), and their ratio to the labeled cases' shares, for
        ``distribution.align_foreground``."""
        shares = self.foreground_shares()
        shares.update(unlabeled_probs.detach())
        return shares.ratio().to(unlabeled_probs.device)

    def on_train_epoch_end(self, train_outputs: list[dict]):
        super().on_train_epoch_end(train_outputs)
        if self._shares is not None:  # what target_alignment did this epoch, for the log
            running, ratio = self._shares.shares(), self._shares.ratio()
            self.print_to_log_file("target_alignment: " + ", ".join(
                f"label {v} model share {running[i]:.3f}, labeled {self._shares.goal[i]:.3f}, ratio {ratio[i]:.2f}"
                for i, v in enumerate(self.foreground_labels())))

    def extra_checkpoint_state(self) -> dict[str, Any]:
        state = super().extra_checkpoint_state()
        if self._shares is not None:
            state["foreground_shares"] = self._shares.state_dict()
        return state

    def load_extra_checkpoint_state(self, state: dict[str, Any]) -> None:
        super().load_extra_checkpoint_state(state)
        if self.hparams.get("target_alignment") and "foreground_shares" in state:
            self.foreground_shares().load_state_dict(state["foreground_shares"])

    def unlabeled_dataset(self) -> UnlabeledDataset:
        """The cases the unlabeled loader draws from (self-training methods return them with pseudo-labels)."""
        return UnlabeledDataset(str(self.unlabeled_folder()), self.unlabeled_identifiers)

    def get_unlabeled_dataloader(self):
        """Patches of ``unlabeled_dataset()`` through the labeled loader's augmentation pipeline and patch size,
        drawn uniformly (no oversampling). No deep-supervision targets: the batch's ``target`` is the full-resolution
        label map (all background for unlabeled cases, the pseudo-label for pseudo-labeled ones)."""
        rotation, dummy_2d, initial_patch_size, mirror_axes = \
            self.configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        lm = self.label_manager
        transforms = self.get_training_transforms(
            self.configuration_manager.patch_size, rotation, None, mirror_axes, dummy_2d,
            use_mask_for_norm=self.configuration_manager.use_mask_for_norm, is_cascaded=False,
            foreground_labels=lm.foreground_labels, regions=lm.foreground_regions if lm.has_regions else None,
            ignore_label=lm.ignore_label)
        batch_size = self.hparams["unlabeled_batch_size"] or self.batch_size
        dl = UnlabeledDataLoader(self.unlabeled_dataset(), batch_size, initial_patch_size,
                                 self.configuration_manager.patch_size, lm, sampling_probabilities=None, pad_sides=None, transforms=transforms)
        n_proc = get_allowed_n_proc_DA()
        if n_proc == 0:
            return SingleThreadedAugmenter(dl, None)
        return NonDetMultiThreadedAugmenter(dl, None, n_proc, max(6, n_proc // 2), None,
                                            pin_memory=self.device.type == "cuda", wait_time=0.002)

    def on_train_start(self):
        self.unlabeled_identifiers = self.prepare_unlabeled_data()
        super().on_train_start()
        if self.draws_unlabeled_batches:
            self.dataloader_unlabeled = self.get_unlabeled_dataloader()

    def shutdown_unlabeled_dataloader(self) -> None:
        if isinstance(self.dataloader_unlabeled, NonDetMultiThreadedAugmenter):
            self.dataloader_unlabeled._finish()
        self.dataloader_unlabeled = None

    def restart_unlabeled_dataloader(self) -> None:
        """Rebuild the unlabeled loader, e.g. after ``unlabeled_dataset()`` changed (its workers hold a copy)."""
        self.shutdown_unlabeled_dataloader()
        if self.draws_unlabeled_batches:
            self.dataloader_unlabeled = self.get_unlabeled_dataloader()

    def on_train_end(self):
        super().on_train_end()
        self.shutdown_unlabeled_dataloader()

    def run_training(self):
        try:
            super().run_training()
        finally:  # also on errors and Ctrl+C: no orphaned augmentation workers
            self.shutdown_unlabeled_dataloader()

    # ---------------------------------------------------------------- the iteration
    def next_unlabeled_batch(self) -> dict:
        """The unlabeled loader's next batch (``data``, ``target``, ``keys``, on the CPU). Override to use more than
        the images (pseudo-labels arrive in ``target``) or to draw no batch at times (an empty ``data``)."""
        return next(self.dataloader_unlabeled)

    def unlabeled_input(self) -> torch.Tensor | None:
        if not self.draws_unlabeled_batches:
            return None  # compute_losses gets data_unlabeled=None
        return self.next_unlabeled_batch()["data"].to(self.device, non_blocking=True)
