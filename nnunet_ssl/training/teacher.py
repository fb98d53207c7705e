"""An exponential-moving-average (mean) teacher, and the trainer hooks that keep one.

``EMATeacher`` holds an fp32 copy of the student's unwrapped network (never DDP-wrapped, never compiled) and
moves it after every optimizer step by theta'_t = a theta'_{t-1} + (1 - a) theta_t with
a = min(1 - 1/(step + 1), alpha) (Tarvainen & Valpola 2017: the true average of the weights seen so far until
the exponential average takes over; at step 0 the teacher becomes a copy of the student). Floating-point
buffers (e.g. BatchNorm statistics) are averaged the same way, other buffers copied.

``TeacherMixin`` adds such a teacher to a ``SemiSupervisedTrainer``: created after ``initialize``, updated in
``after_optimizer_step``, saved into the checkpoint's ``nnunet_ssl`` entry and restored by ``--c``. With
``export_teacher`` the checkpoints' ``network_weights`` (what nnU-Net's predictor loads) are the teacher's, the
student's go into the ``nnunet_ssl`` entry (so ``--c`` still resumes the student), and nnU-Net's validation
(the pseudo Dice that picks ``checkpoint_best.pth``, and the final validation) runs on the teacher's weights.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any, ClassVar

import torch
from torch import nn

from nnunet_ssl.training.hparams import HParam

TEACHER_HPARAMS: dict[str, HParam] = {
    "ema_alpha": HParam(0.99, float, "EMA decay alpha of the teacher's weights (warm start "
                                     "min(1 - 1/(step + 1), alpha)).", low=0.0, high=1.0, high_exclusive=True),
    "export_teacher": HParam(False, bool, "Write the teacher's weights as the checkpoints' network_weights (used "
                                          "for prediction and nnU-Net's validation) instead of the student's."),
}


def _tensors(module: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    # named_parameters/named_buffers list a tensor shared by two modules once (nnU-Net's decoder keeps a
    # reference to the encoder), where state_dict() would list it twice and the update would apply twice
    yield from module.named_parameters()
    yield from module.named_buffers()


class EMATeacher:
    def __init__(self, student: nn.Module, alpha: float):
        if not 0.0 <= alpha < 1.0:
            raise ValueError(f"EMA decay alpha = {alpha!r} is invalid: it must lie in [0, 1) (0.99 is usual).")
        self.alpha = float(alpha)
        self.module = copy.deepcopy(student).float()
        self.module.requires_grad_(False)
        self.module.eval()  # a target provider: methods sample their own noise (e.g. explicit MC dropout)

    def decay(self, step: int) -> float:
        """The decay used by the update after optimizer step number ``step`` (0 for the first)."""
        return min(1.0 - 1.0 / (step + 1), self.alpha)

    @torch.no_grad()
    def update(self, student: nn.Module, step: int) -> None:
        a = self.decay(step)
        source = dict(_tensors(student))
        ema_t, ema_s, copy_t, copy_s = [], [], [], []
        for name, t in _tensors(self.module):
            s = source[name].detach()
            if t.is_floating_point():
                ema_t.append(t)
                ema_s.append(s.to(t.dtype))
            else:
                copy_t.append(t)
                copy_s.append(s)
        if ema_t:
            torch._foreach_mul_(ema_t, a)
            torch._foreach_add_(ema_t, ema_s, alpha=1.0 - a)
        for t, s in zip(copy_t, copy_s):
            t.copy_(s)

    @torch.no_grad()
    def copy_from(self, student: nn.Module) -> None:
        """Make the teacher an exact copy of the student's weights."""
        self.module.load_state_dict(student.state_dict())

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.module.state_dict()

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        self.module.load_state_dict(state)


@contextmanager
def weights_swapped_in(network: nn.Module, state: Mapping[str, torch.Tensor]) -> Iterator[None]:
    """Run ``network`` with the weights ``state`` inside the block and restore its own (bit for bit) after."""
    own = {k: v.detach().clone() for k, v in network.state_dict().items()}
    network.load_state_dict(state)
    try:
        yield
    finally:
        network.load_state_dict(own)


class TeacherMixin:
    """EMA teacher hooks for a ``SemiSupervisedTrainer`` (put the mixin first in the bases). Needs the
    hyper-parameters of ``TEACHER_HPARAMS``; the teacher is ``self.teacher.module``."""

    teacher_state_key: ClassVar[str] = "teacher"

    def initialize(self):
        super().initialize()
        self.teacher = EMATeacher(self.unwrapped_network(), self.hparams["ema_alpha"])
        self._teacher_restored = False

    def after_optimizer_step(self) -> None:
        super().after_optimizer_step()
        self.teacher.update(self.unwrapped_network(), self.global_step)

    # ---------------------------------------------------------------- checkpoints
    def checkpoint_network_weights(self) -> dict[str, torch.Tensor]:
        if self.hparams["export_teacher"]:
            return self.teacher.state_dict()
        return super().checkpoint_network_weights()

    def extra_checkpoint_state(self) -> dict[str, Any]:
        state = super().extra_checkpoint_state()
        state[self.teacher_state_key] = self.teacher.state_dict()
        if self.hparams["export_teacher"]:
            state["student_weights"] = self.unwrapped_network().state_dict()
        return state

    def load_extra_checkpoint_state(self, state: dict[str, Any]) -> None:
        super().load_extra_checkpoint_state(state)
        if "student_weights" in state:  # network_weights held the teacher's weights
            self.unwrapped_network().load_state_dict(state["student_weights"])
        self.teacher.alpha = self.hparams["ema_alpha"]  # the checkpoint's hyper-parameters are in force now
        if self.teacher_state_key in state:
            self.teacher.load_state_dict(state[self.teacher_state_key])
            self._teacher_restored = True

    def load_checkpoint(self, filename_or_checkpoint) -> None:
        super().load_checkpoint(filename_or_checkpoint)
        if not self._teacher_restored:  # a checkpoint without a teacher: start it from the loaded student
            self.print_to_log_file("The checkpoint holds no teacher; the teacher starts as a copy of the student.")
            self.teacher.copy_from(self.unwrapped_network())

    # ---------------------------------------------------------------- validation on the exported weights
    @contextmanager
    def _exported_weights(self) -> Iterator[None]:
        if self.hparams["export_teacher"]:
            with weights_swapped_in(self.unwrapped_network(), self.teacher.state_dict()):
                yield
        else:
            yield

    def on_validation_epoch_start(self):
        super().on_validation_epoch_start()
        self._validation_weights = self._exported_weights()
        self._validation_weights.__enter__()

    def on_validation_epoch_end(self, val_outputs):
        try:
            super().on_validation_epoch_end(val_outputs)
        finally:
            self._validation_weights.__exit__(None, None, None)

    def perform_actual_validation(self, save_probabilities: bool = False):
        with self._exported_weights():
            return super().perform_actual_validation(save_probabilities)
