"""``SupervisedTrainer``: nnU-Net's trainer plus what every nnunet-ssl trainer shares.

Training is exactly ``nnUNetTrainer``'s (same network, loss, augmentation, optimizer). Added:

- hyper-parameters from ``nnUNet_ssl_hparams`` (the schedule here; methods add their own), validated in
  ``__init__`` before anything runs, written to ``ssl_hparams.json`` in the fold folder and to checkpoints;
- the choice of nnU-Net's augmentation (``augmentation``: ``nnUNetTrainer``'s or ``nnUNetTrainerDA5``'s) for every
  training pipeline a trainer builds;
- the labeled-fraction file: cases declared unlabeled for the fold are removed from the labeled set, so this
  trainer is the supervised baseline on *the same labeled cases* as the semi-supervised ones;
- checkpoints written atomically (temporary file, then rename) with an extra ``nnunet_ssl`` entry for
  method state, restored by ``nnUNetv2_train ... --c``;
- extra per-epoch log keys drawn in a panel of their own in ``progress.png``;
- one training iteration for every trainer (``compute_losses`` is the method's hook): an iteration whose loss or
  gradient is not finite is skipped (no parameter update, no ``after_optimizer_step``), counted and logged, and
  training stops when ``max_nonfinite_steps`` come in a row;
- an optional ``seed`` for reproducible runs;
- the final validation also writes calibration metrics (ECE, reliability diagram) next to ``summary.json``.
"""

from __future__ import annotations

import glob
import os
import random
from typing import Any, ClassVar

import numpy as np
import torch
from batchgenerators.utilities.file_and_folder_operations import isfile, join
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.training.nnUNetTrainer.variants.data_augmentation.nnUNetTrainerDA5 import nnUNetTrainerDA5
from nnunetv2.utilities.collate_outputs import collate_outputs
from nnunetv2.utilities.helpers import dummy_context
from torch import autocast
from torch import distributed as dist
from torch._dynamo import OptimizedModule

from nnunet_ssl.data.labeled_fraction import FILENAME as LABELED_FRACTION_FILE
from nnunet_ssl.data.labeled_fraction import check_declared_cases, declared_unlabeled_cases
from nnunet_ssl.data.unlabeled import replace_atomic, write_json_atomic
from nnunet_ssl.evaluation.calibration import validation_calibration
from nnunet_ssl.training.hparams import (
    ENV_VAR,
    HParam,
    HParamError,
    checkpoint_hparams,
    read_overrides,
    resolve_hparams,
)
from nnunet_ssl.training.logging import SSLLocalLogger

CUDA = torch.device("cuda")  # nnU-Net's default device, a module constant for the signature
# nnU-Net's variants whose two augmentation hooks the ``augmentation`` hyper-parameter can select instead of the
# default ones (those of the next class in the MRO: nnUNetTrainer's, or a variant a subclass mixes in)
AUGMENTATIONS: dict[str, type[nnUNetTrainer]] = {"da5": nnUNetTrainerDA5}

SCHEDULE_HPARAMS: dict[str, HParam] = {
    "num_epochs": HParam(1000, int, "Training epochs (nnU-Net's default 1000).", low=1),
    "num_iterations_per_epoch": HParam(250, int, "Training iterations per epoch (nnU-Net's default 250).", low=1),
    "num_val_iterations_per_epoch": HParam(50, int, "Validation iterations per epoch (nnU-Net's default 50).",
                                           low=1),
    "save_every": HParam(50, int, "Write checkpoint_latest.pth every this many epochs (nnU-Net's default 50).", low=1),
    "seed": HParam(None, int, "Seed of Python's, numpy's and torch's random generators (network initialisation, "
                              "patch sampling, augmentation, dropout), offset by the DDP rank. With "
                              "nnUNet_n_proc_DA=0 on the CPU two runs give identical losses; augmentation workers "
                              "are not seeded. null: unseeded, as nnU-Net.", low=0, optional=True),
    "final_validation_mirroring": HParam(True, bool, "Mirror the validation cases in nnU-Net's final validation "
                                                     "(test-time augmentation, which nnU-Net always uses there); false: "
                                                     "unmirrored, like nnUNetv2_predict --disable_tta.",
                                        affects_training=False),
    "max_nonfinite_steps": HParam(10, int, "Stop training when this many iterations in a row have a non-finite loss "
                                           "or gradient (each is skipped: no parameter or teacher update).", low=1),
    "augmentation": HParam("default", str, "Data augmentation of every training batch (labeled, unlabeled, "
                                           "pseudo-labeled, pairs): 'default' is nnUNetTrainer's, 'da5' "
                                           "nnUNetTrainerDA5's (more and stronger intensity and spatial transforms).",
                           choices=("default", *AUGMENTATIONS)),
}


class NonFiniteLossError(RuntimeError):
    """Too many iterations in a row had a non-finite loss or gradient."""


class SupervisedTrainer(nnUNetTrainer):
    hparam_spec: ClassVar[dict[str, HParam]] = SCHEDULE_HPARAMS
    extra_log_keys: ClassVar[tuple[str, ...]] = ()

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = CUDA):
        super().__init__(plans, configuration, fold, dataset_json, device)
        overrides = read_overrides()  # once: nnUNet_ssl_hparams may name a JSON file
        self.hparams_set = set(overrides)  # the names it sets
        self.hparams: dict[str, Any] = resolve_hparams(self.hparam_spec, type(self).__name__, overrides)
        self._apply_hparams()
        self.logger.local_logger = SSLLocalLogger(self.extra_log_keys)
        self.declared_unlabeled: list[str] = []
        self._split: tuple[list[str], list[str]] | None = None
        self._step_in_epoch = 0
        self.nonfinite_steps = 0  # skipped iterations over the whole training (kept in checkpoints)
        self._nonfinite_in_a_row = 0
        if self.hparams["seed"] is not None:  # before initialize() builds the network
            self.seed_everything(self.hparams["seed"] + self.local_rank)

    def _apply_hparams(self) -> None:
        self.num_epochs = self.hparams["num_epochs"]
        self.num_iterations_per_epoch = self.hparams["num_iterations_per_epoch"]
        self.num_val_iterations_per_epoch = self.hparams["num_val_iterations_per_epoch"]
        self.save_every = self.hparams["save_every"]

    # ---------------------------------------------------------------- augmentation
    # nnU-Net calls both hooks on the trainer; here they are instance methods so that the ``augmentation``
    # hyper-parameter picks the nnU-Net trainer whose hooks run (every loader of the plugin builds its pipeline here).
    # 'default' defers to the next class in the MRO, so a subclass mixing in an nnU-Net variant keeps its hooks.
    def configure_rotation_dummyDA_mirroring_and_inital_patch_size(self):
        if self.hparams["augmentation"] == "default":
            return super().configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        return AUGMENTATIONS[self.hparams["augmentation"]].configure_rotation_dummyDA_mirroring_and_inital_patch_size(
            self)

    def get_training_transforms(self, patch_size, rotation_for_DA, deep_supervision_scales, mirror_axes,
                                do_dummy_2d_data_aug, use_mask_for_norm=None, is_cascaded=False, foreground_labels=None,
                                regions=None, ignore_label=None):
        source = super() if self.hparams["augmentation"] == "default" else AUGMENTATIONS[self.hparams["augmentation"]]
        return source.get_training_transforms(
            patch_size, rotation_for_DA, deep_supervision_scales, mirror_axes, do_dummy_2d_data_aug,
            use_mask_for_norm=use_mask_for_norm, is_cascaded=is_cascaded, foreground_labels=foreground_labels,
            regions=regions, ignore_label=ignore_label)

    @staticmethod
    def seed_everything(seed: int) -> None:
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)

    # ---------------------------------------------------------------- labeled-fraction experiments
    def do_split(self):
        if self._split is None:
            tr_keys, val_keys = super().do_split()
            declared = declared_unlabeled_cases(self.preprocessed_dataset_folder_base, self.fold)
            if declared:
                check_declared_cases(declared, tr_keys, val_keys, self.fold,
                                     join(self.preprocessed_dataset_folder_base, LABELED_FRACTION_FILE))
                tr_keys = [k for k in tr_keys if k not in declared]
                self.print_to_log_file(f"{len(declared)} training case(s) declared unlabeled in "
                                       f"{LABELED_FRACTION_FILE}; {len(tr_keys)} labeled training case(s) remain.")
            self.declared_unlabeled = declared
            self._split = (list(tr_keys), list(val_keys))
        return self._split

    # ---------------------------------------------------------------- the iteration
    @property
    def global_step(self) -> int:
        """Iterations run so far, skipped ones included (restored on resume: checkpoints are written at epoch
        ends)."""
        return self.current_epoch * self.num_iterations_per_epoch + self._step_in_epoch

    def unlabeled_input(self) -> torch.Tensor | None:
        """The unlabeled images of this iteration on the device (None: the method draws none)."""
        return None

    def compute_losses(self, data: torch.Tensor, target, data_unlabeled: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """Return ``{'loss': total, <name>: part, ...}``; the parts named in ``extra_log_keys`` are logged.
        Here nnU-Net's forward pass and Dice+CE with deep supervision."""
        return {"loss": self.loss(self.network(data), target)}

    def after_optimizer_step(self) -> None:
        """Called after every optimizer step that was taken (EMA teachers update here)."""

    def on_train_epoch_start(self):
        super().on_train_epoch_start()
        self._step_in_epoch = 0

    def train_step(self, batch: dict) -> dict:
        data = batch["data"].to(self.device, non_blocking=True)
        target = batch["target"]
        target = [t.to(self.device, non_blocking=True) for t in target] if isinstance(target, list) \
            else target.to(self.device, non_blocking=True)
        data_u = self.unlabeled_input()

        self.optimizer.zero_grad(set_to_none=True)
        with autocast(self.device.type, enabled=True) if self.device.type == "cuda" else dummy_context():
            losses = self.compute_losses(data, target, data_u)
        total = losses["loss"]
        status = self._backward_and_step(total) if self._agreed_finite(total) else "loss"
        if status == "ok":
            self._nonfinite_in_a_row = 0
            self.after_optimizer_step()
        self._step_in_epoch += 1
        outputs = {k: v.detach().float().cpu().numpy() for k, v in losses.items()}
        skipped = status in ("loss", "gradient")
        if skipped:
            self._skip_step(status, outputs)
        outputs["skipped"] = skipped
        return outputs

    def _agreed_finite(self, value: torch.Tensor) -> bool:
        """Whether ``value`` is finite on every rank (so that all ranks skip together, or none)."""
        finite = torch.isfinite(value.detach()).all().float()
        if self.is_ddp:
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        return bool(finite.item())

    def _backward_and_step(self, total: torch.Tensor) -> str:
        """nnU-Net's backward pass, gradient clipping and optimizer step. Returns 'ok', 'gradient' (a non-finite
        gradient norm without mixed precision: no step) or 'overflow' (mixed precision: the grad scaler skipped
        the step and lowered its scale, as it routinely does; not a fault, but no teacher update either)."""
        if self.grad_scaler is not None:
            self.grad_scaler.scale(total).backward()
            self.grad_scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.network.parameters(), 12)
            scale = self.grad_scaler.get_scale()
            self.grad_scaler.step(self.optimizer)
            self.grad_scaler.update()
            return "overflow" if self.grad_scaler.get_scale() < scale else "ok"
        total.backward()
        norm = torch.nn.utils.clip_grad_norm_(self.network.parameters(), 12)
        if not torch.isfinite(norm):  # gradients are averaged over DDP ranks already: every rank agrees
            return "gradient"
        self.optimizer.step()
        return "ok"

    def _skip_step(self, fault: str, outputs: dict[str, np.ndarray]) -> None:
        self.nonfinite_steps += 1
        self._nonfinite_in_a_row += 1
        parts = ", ".join(f"{k} {float(v):.4g}" for k, v in outputs.items())
        self.print_to_log_file(
            f"epoch {self.current_epoch}, iteration {self._step_in_epoch}: non-finite {fault} ({parts}); the step "
            f"was skipped (no parameter or teacher update). {self._nonfinite_in_a_row} in a row, "
            f"{self.nonfinite_steps} in this training.", also_print_to_console=True)
        limit = self.hparams["max_nonfinite_steps"]
        if self._nonfinite_in_a_row >= limit:
            raise NonFiniteLossError(
                f"{type(self).__name__} stopped: {limit} iterations in a row had a non-finite loss or gradient "
                f"(max_nonfinite_steps; last: {parts}). The weights are those of the last finite step and "
                f"{self.output_folder}/checkpoint_latest.pth holds the last saved epoch. Common causes: images with "
                f"NaN or extreme values (`nnUNetv2_plan_and_preprocess --verify_dataset_integrity`, `nnunet_ssl "
                f"preprocess-unlabeled --check-only`), a learning rate or loss weight too high (nnUNet_ssl_hparams). "
                f"Fix the cause, then resume with `nnUNetv2_train ... --c`.")

    def on_train_epoch_end(self, train_outputs: list[dict]):
        # skipped iterations are left out of the epoch means (their losses are not finite)
        kept = [{k: v for k, v in o.items() if k != "skipped"} for o in train_outputs if not o.get("skipped")]
        skipped = len(train_outputs) - len(kept)
        if skipped:
            self.print_to_log_file(f"{skipped} of {len(train_outputs)} iterations skipped in this epoch (non-finite "
                                   f"loss or gradient), {self.nonfinite_steps} in this training.")
        if not kept:
            kept = [{k: np.array(np.nan) for k in train_outputs[0] if k != "skipped"}]
        super().on_train_epoch_end(kept)
        if not self.extra_log_keys:
            return
        outputs = collate_outputs(kept)
        for key in self.extra_log_keys:
            value: Any = np.mean(outputs[key])
            if self.is_ddp:
                gathered = [None] * dist.get_world_size()
                dist.all_gather_object(gathered, value)
                value = float(np.mean(gathered))
            self.logger.log(key, float(value), self.current_epoch)
        self.print_to_log_file(", ".join(f"{k} {np.round(self.logger.get_value(k, step=-1), 5)}"
                                         for k in self.extra_log_keys))

    # ---------------------------------------------------------------- state and checkpoints
    def on_train_start(self):
        super().on_train_start()
        if self.local_rank == 0:
            write_json_atomic({"trainer": type(self).__name__, "hparams": self.hparams},
                              join(self.output_folder, "ssl_hparams.json"))
            self.print_to_log_file(f"nnunet_ssl hyper-parameters in force: {self.hparams}")

    def unwrapped_network(self) -> torch.nn.Module:
        mod = self.network.module if self.is_ddp else self.network
        return mod._orig_mod if isinstance(mod, OptimizedModule) else mod

    def checkpoint_network_weights(self) -> dict[str, torch.Tensor]:
        """The checkpoint's ``network_weights`` (what nnU-Net's predictor loads): the student's by default. A
        method exporting other weights keeps the student's in its extra state, so that ``--c`` resumes it."""
        return self.unwrapped_network().state_dict()

    def extra_checkpoint_state(self) -> dict[str, Any]:
        """Method state saved with the checkpoint (override and call super)."""
        return {"hparams": dict(self.hparams), "nonfinite_steps": self.nonfinite_steps}

    def load_extra_checkpoint_state(self, state: dict[str, Any]) -> None:
        """Restore what ``extra_checkpoint_state`` saved (override and call super)."""
        self.nonfinite_steps = state.get("nonfinite_steps", 0)

    def save_checkpoint(self, filename: str) -> None:
        # nnU-Net's checkpoint dict (same keys, so nnU-Net's predictor and --c read it) plus our entry, written to a
        # temporary file and renamed: an interruption never leaves a truncated checkpoint behind.
        if self.local_rank != 0:
            return
        if self.disable_checkpointing:
            self.print_to_log_file("No checkpoint written, checkpointing is disabled")
            return
        checkpoint = {
            "network_weights": self.checkpoint_network_weights(),
            "optimizer_state": self.optimizer.state_dict(),
            "grad_scaler_state": self.grad_scaler.state_dict() if self.grad_scaler is not None else None,
            "logging": self.logger.get_checkpoint(),
            "_best_ema": self._best_ema,
            "current_epoch": self.current_epoch + 1,
            "init_args": self.my_init_kwargs,
            "trainer_name": self.__class__.__name__,
            "inference_allowed_mirroring_axes": self.inference_allowed_mirroring_axes,
            "nnunet_ssl": self.extra_checkpoint_state(),
        }
        for stale in glob.glob(os.path.join(os.path.dirname(filename), ".ckpt.*.tmp")):  # left by a killed run
            os.remove(stale)
        replace_atomic(lambda tmp: torch.save(checkpoint, tmp), filename, prefix=".ckpt.")

    def load_checkpoint(self, filename_or_checkpoint: str) -> None:
        super().load_checkpoint(filename_or_checkpoint)
        state = torch.load(filename_or_checkpoint, map_location="cpu", weights_only=False).get("nnunet_ssl")
        if state is None:
            self.print_to_log_file(f"{filename_or_checkpoint} has no nnunet_ssl state (not written by an nnunet_ssl "
                                   f"trainer); method state starts fresh.")
            return
        saved = checkpoint_hparams(self.hparam_spec, type(self).__name__, state["hparams"])
        # a value set now must equal the checkpoint's if training reads it; what is not set is the checkpoint's
        diff = {k: (saved[k], self.hparams[k]) for k in self.hparams_set
                if self.hparam_spec[k].affects_training and saved[k] != self.hparams[k]}
        if diff:
            raise HParamError(
                f"{filename_or_checkpoint} was trained with other hyper-parameters than {ENV_VAR} sets now "
                f"(name: (checkpoint, now)): {diff}. To resume exactly, set {ENV_VAR} to the checkpoint's values "
                f"or leave them out (the checkpoint's values are then used); to change them, start a new training.")
        self.hparams = {**saved, **{k: self.hparams[k] for k in self.hparams_set}}
        self._apply_hparams()
        self.load_extra_checkpoint_state(state)

    # ---------------------------------------------------------------- final validation
    def perform_actual_validation(self, save_probabilities: bool = False):
        """nnU-Net's validation, run with probabilities saved so that ``validation/calibration.json`` and
        ``validation/reliability_diagram.png`` can be computed from them (at the original image geometry, against
        ``gt_segmentations``); the probability files are removed again unless ``--npz`` asked for them."""
        folder = join(self.output_folder, "validation")
        _, val_keys = self.do_split()
        created = [k for k in val_keys if not isfile(join(folder, f"{k}.npz"))]
        axes = self.inference_allowed_mirroring_axes
        if not self.hparams["final_validation_mirroring"]:
            # nnU-Net's predictor mirrors along these axes; the checkpoints keep them for nnUNetv2_predict
            self.inference_allowed_mirroring_axes = None
        try:
            super().perform_actual_validation(True)
        finally:
            self.inference_allowed_mirroring_axes = axes
        if self.local_rank == 0 and val_keys:
            result = validation_calibration(folder, join(self.preprocessed_dataset_folder_base, "gt_segmentations"),
                                            self.dataset_json, self.plans_manager.plans, val_keys,
                                            save_probabilities, created)
            self.print_to_log_file(f"Calibration (15 bins): foreground ECE {result['pooled']['foreground']['ECE']}, "
                                   f"all-voxel ECE {result['pooled']['all']['ECE']} (validation/calibration.json)",
                                   also_print_to_console=True)
