"""UG-MCL and the mean-teacher family on nnU-Net's planned U-Net.

- ``MeanTeacherTrainer``: EMA teacher, MSE between student and teacher probabilities (Tarvainen & Valpola 2017);
  ``consistency_loss`` 'pseudo_label' (not in the papers) swaps in FixMatch's confident cross-entropy.
- ``UAMTTrainer``: the same consistency, masked by the teacher's Monte-Carlo uncertainty (Yu et al. 2019).
- ``DTCTrainer``: dual-task network (segmentation + signed distance regression), cross-task consistency, no
  teacher (Luo et al. 2021; row 4 of the UG-MCL ablation); ``cross_view_gamma`` (not in the paper) pairs the
  tasks across a contrast change of the unlabeled patches.
- ``UGMCLTrainer``: all of it: eq. 2 supervised loss, uncertainty-masked intra-task consistency of both
  branches (eq. 3-4), cross-task consistency (eq. 5-6), ramped weights (eq. 7).

One iteration: the labeled and the unlabeled batch go through the student in one call (dropout active), the
teacher (EMA weights, never compiled) gets the same patches with Gaussian input noise and runs its stochastic
passes without gradient, then one loss, one backward, one optimizer step and the teacher's EMA update.
"""

from __future__ import annotations

from functools import cached_property, partial
from typing import ClassVar

import torch
from batchgeneratorsv2.transforms.intensity.brightness import BrightnessAdditiveTransform
from batchgeneratorsv2.transforms.intensity.contrast import BGContrast, ContrastTransform
from batchgeneratorsv2.transforms.intensity.gamma import GammaTransform
from batchgeneratorsv2.transforms.intensity.gaussian_noise import GaussianNoiseTransform
from batchgeneratorsv2.transforms.local.brightness_gradient import BrightnessGradientAdditiveTransform
from batchgeneratorsv2.transforms.local.local_gamma import LocalGammaTransform
from batchgeneratorsv2.transforms.noise.gaussian_blur import GaussianBlurTransform
from batchgeneratorsv2.transforms.noise.median_filter import MedianFilterTransform
from batchgeneratorsv2.transforms.noise.sharpen import SharpeningTransform
from batchgeneratorsv2.transforms.spatial.low_resolution import SimulateLowResolutionTransform
from batchgeneratorsv2.transforms.utils.compose import ComposeTransforms
from batchgeneratorsv2.transforms.utils.random import OneOfTransform, RandomTransform
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.training.nnUNetTrainer.variants.data_augmentation.nnUNetTrainerDA5 import nnUNetTrainerDA5
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager
from torch import nn

from nnunet_ssl.methods.ugmcl.losses import (
    cross_task_consistency,
    intra_task_consistency,
    mean_teacher_consistency,
    pseudo_label_consistency,
    sdf_regression_loss,
    supervised_objective,
    total_objective,
)
from nnunet_ssl.methods.ugmcl.network import DualTaskUNet, MCPrediction
from nnunet_ssl.training.base import SSL_HPARAMS, SemiSupervisedTrainer
from nnunet_ssl.training.distance import SignedDistanceTransform
from nnunet_ssl.training.hparams import HParam
from nnunet_ssl.training.ramps import RAMPS, rampup
from nnunet_ssl.training.teacher import TEACHER_HPARAMS, TeacherMixin
from nnunet_ssl.training.uncertainty import (
    certainty_mask,
    predictive_entropy,
    probabilities,
    uncertainty_threshold,
)

WHICH_IMAGES = ("unlabeled", "all")
CONSISTENCY_LOSSES = ("mse", "pseudo_label")

COMMON_HPARAMS: dict[str, HParam] = {
    **SSL_HPARAMS,
    "consistency_weight": HParam(0.1, float, "Final weight lambda_i of the teacher consistency (eq. 7).", low=0.0),
    "rampup": HParam("sigmoid", str, "Ramp-up of the weights and the uncertainty threshold: 'sigmoid' is the "
                                     "Gaussian exp(-5 (1 - t/t_max)^2) of eq. 7.", choices=RAMPS),
    "rampup_fraction": HParam(1.0, float, "t_max of the ramp-up as a fraction of all iterations (the paper: all).",
                              low=0.0, high=1.0),
    "dropout_p": HParam(0.5, float, "Channel dropout probability on the last decoder features (student training "
                                    "and the teacher's Monte-Carlo passes).", low=0.0, high=1.0,
                        high_exclusive=True),
}
MEAN_TEACHER_HPARAMS: dict[str, HParam] = {
    **COMMON_HPARAMS,
    **TEACHER_HPARAMS,
    "teacher_noise_std": HParam(0.1, float, "Std of the Gaussian noise added to the teacher's input.", low=0.0),
    "teacher_noise_clip": HParam(0.2, float, "The teacher's input noise is clipped to [-clip, clip].", low=0.0),
    "student_gamma": HParam(0.0, float, "Not in the papers: probability that an unlabeled patch's student copy gets "
                                        "a random gamma curve the teacher's copy does not (nnU-Net's GammaTransform, "
                                        "gamma in (0.7, 1.5), statistics kept), so the consistency term asks for "
                                        "the same prediction under a contrast change. 0: the papers' perturbation "
                                        "only.", low=0.0, high=1.0),
    "student_intensity": HParam(0.0, float, "Not in the papers: probability that an unlabeled patch's student copy "
                                            "goes through the intensity transforms of nnU-Net's nnUNetTrainerDA5 "
                                            "(filters, noise, brightness, contrast, low resolution, gamma, "
                                            "brightness gradient, local gamma, sharpening; each at DA5's own "
                                            "probability and range) that the teacher's copy does not, after "
                                            "student_gamma's curve. 0: none.", low=0.0, high=1.0),
    "consistency_on": HParam("unlabeled", str, "Images that get the teacher consistency term.",
                             choices=WHICH_IMAGES),
    "consistency_loss": HParam("mse", str, "The teacher consistency term: 'mse' between the probabilities (the "
                                           "papers'); 'pseudo_label' (not in the papers): FixMatch's cross-entropy "
                                           "against the teacher's hard labels where it is confident (see "
                                           "confidence_threshold).", choices=CONSISTENCY_LOSSES),
    "confidence_threshold": HParam(0.95, float, "consistency_loss 'pseudo_label' only: the teacher's probability "
                                                "a voxel's label needs to count (FixMatch's tau).", low=0.0,
                                   high=1.0),
}
UAMT_HPARAMS: dict[str, HParam] = {
    **MEAN_TEACHER_HPARAMS,
    "mc_passes": HParam(8, int, "Stochastic teacher passes T for the uncertainty (eq. 3).", low=1),
}
SDF_HPARAMS: dict[str, HParam] = {
    "sdf_weight": HParam(1.0, float, "Weight of the signed distance regression loss L_dis in eq. 2.", low=0.0),
    "cross_task_weight": HParam(0.1, float, "Final weight lambda_c of the cross-task consistency (eq. 7).",
                                low=0.0),
    "sdf_k": HParam(1500.0, float, "Transform factor k of the inverse transform sigmoid(-k sdf) (eq. 5).",
                    low=1.0),
    "cross_task_on": HParam("all", str, "Images that get the cross-task consistency term (eq. 6).",
                            choices=WHICH_IMAGES),
}
DTC_HPARAMS: dict[str, HParam] = {
    **{k: v for k, v in COMMON_HPARAMS.items() if k != "consistency_weight"},
    **SDF_HPARAMS,
    "cross_view_gamma": HParam(0.0, float, "Not in the paper: probability that an unlabeled patch is also seen "
                                           "through a random gamma curve (student_gamma's transform); eq. 6 then "
                                           "pairs each view's segmentation with the other view's level set, so the "
                                           "cross-task term asks for the same segmentation under a contrast change. "
                                           "0: the paper's same-view pairs only.", low=0.0, high=1.0),
}
UGMCL_HPARAMS: dict[str, HParam] = {  # eq. 4's squared differences: no consistency_loss choice
    **{k: v for k, v in UAMT_HPARAMS.items() if k not in ("consistency_loss", "confidence_threshold")},
    **SDF_HPARAMS,
    "consistency_on": HParam("all", str, "Images that get the intra-task consistency term (eq. 4; the paper: "
                                         "labeled and unlabeled).", choices=WHICH_IMAGES),
    "beta": HParam(0.75, float, "Balance beta between the segmentation and the regression term of eq. 4.",
                   low=0.0, high=1.0),
}

# student_gamma's transform: nnU-Net's gamma augmentation without inversion, statistics kept
STUDENT_GAMMA = GammaTransform(BGContrast((0.7, 1.5)), p_invert_image=0, synchronize_channels=False, p_per_channel=1,
                               p_retain_stats=1)

# student_intensity's transforms: the intensity part of nnUNetTrainerDA5's pipeline (no spatial, mirroring, masking,
# segmentation or blank-rectangle transform: the student's patch must stay aligned with the teacher's)
DA5_INTENSITY_TRANSFORMS = (MedianFilterTransform, GaussianBlurTransform, GaussianNoiseTransform,
                            BrightnessAdditiveTransform, ContrastTransform, SimulateLowResolutionTransform,
                            GammaTransform, BrightnessGradientAdditiveTransform, LocalGammaTransform,
                            SharpeningTransform)


def _leaves(transform) -> list:
    if isinstance(transform, RandomTransform):
        return _leaves(transform.transform)
    if isinstance(transform, OneOfTransform):
        return [leaf for t in transform.list_of_transforms for leaf in _leaves(t)]
    return [transform]


def da5_intensity_transforms(patch_size, do_dummy_2d_data_aug: bool) -> ComposeTransforms:
    """nnUNetTrainerDA5's training pipeline for ``patch_size`` reduced to its intensity transforms, each kept with
    its random wrapper (DA5's probabilities), in DA5's order."""
    pipeline = nnUNetTrainerDA5.get_training_transforms(patch_size, 0.0, None, None, do_dummy_2d_data_aug)
    return ComposeTransforms([t for t in pipeline.transforms
                              if all(isinstance(leaf, DA5_INTENSITY_TRANSFORMS) for leaf in _leaves(t))])


def _network(plans_manager: PlansManager, configuration_manager: ConfigurationManager, num_input_channels: int,
             num_output_channels: int, enable_deep_supervision: bool, regression_head: bool) -> DualTaskUNet:
    return DualTaskUNet(nnUNetTrainer.build_network_architecture(
        plans_manager, configuration_manager, num_input_channels, num_output_channels, enable_deep_supervision),
        regression_head=regression_head)


def dropout_advice(num_labeled: int, dropout_p: float) -> str | None:
    """A warning for the training log when the student's dropout meets a single labeled case, the setting where the
    benchmark measured it stopping the student from learning a class (docs/benchmarks.md); None otherwise."""
    if num_labeled != 1 or dropout_p == 0:
        return None
    return (f"warning: dropout_p = {dropout_p} with a single labeled training case. On the benchmark's "
            f"one-population cohort this dropout kept MeanTeacher, UAMT, DTC and UG-MCL from learning a class (12 to "
            f"17 Dice points below nnU-Net; level with it at dropout_p 0). Consider setting dropout_p to 0 through "
            f"nnUNet_ssl_hparams (README, UGMCLTrainer: Dropout).")


def mc_passes_advice(dropout_p: float, mc_passes: int) -> str | None:
    """A note for the training log when the teacher's Monte-Carlo passes cannot differ (no dropout: the channel
    dropout is their only randomness, the input noise is drawn once); None otherwise."""
    if dropout_p != 0 or mc_passes == 1:
        return None
    return (f"note: dropout_p = 0, so the teacher's {mc_passes} Monte-Carlo passes are one prediction repeated and "
            f"the uncertainty of eq. 3 is that prediction's entropy. Set dropout_p > 0 for the papers' Monte-Carlo "
            f"uncertainty, or mc_passes to 1 to say what is computed.")


def _images(which: str, num_labeled: int) -> slice:
    return slice(num_labeled, None) if which == "unlabeled" else slice(None)


def _drawn(n: int, p: float) -> list[int]:
    """The indices among ``n`` patches that a draw with probability ``p`` each picks."""
    return torch.nonzero(torch.rand(n) < p).flatten().tolist()


def cross_view_pairs(images: range, copied: list[int], first_copy: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(segmentation index, level-set index) pairs of eq. 6 over a batch of ``images`` followed by gamma copies of
    the images ``copied`` (copy t at ``first_copy + t``): a same-view pair per image that has no copy, and for each
    copied image both cross-view pairs (its segmentation with its copy's level set, and the reverse)."""
    seg = [i for i in images if i not in copied]
    sdf = list(seg)
    for t, i in enumerate(copied):
        seg += [i, first_copy + t]
        sdf += [first_copy + t, i]
    return torch.tensor(seg), torch.tensor(sdf)


class ConsistencyTrainerBase(SemiSupervisedTrainer):
    """What the four trainers share: the dropout U-Net, splitting and using nnU-Net's targets, the ramp."""

    hparam_spec: ClassVar[dict[str, HParam]] = COMMON_HPARAMS
    regression_head: ClassVar[bool] = False

    @classmethod
    def build_network_architecture(cls, plans_manager: PlansManager, configuration_manager: ConfigurationManager,
                                   num_input_channels: int, num_output_channels: int,
                                   enable_deep_supervision: bool = True) -> nn.Module:
        return _network(plans_manager, configuration_manager, num_input_channels, num_output_channels,
                        enable_deep_supervision, regression_head=cls.regression_head)

    def initialize(self):
        super().initialize()
        self.apply_method_hparams()

    def on_train_start(self):
        super().on_train_start()
        for advice in self.training_advice():
            if advice is not None:
                self.print_to_log_file(advice)

    def training_advice(self) -> list[str | None]:
        """Warnings and notes for the training log about this run's settings (None: nothing to say)."""
        return [dropout_advice(len(self.do_split()[0]), self.hparams["dropout_p"])]

    def apply_method_hparams(self) -> None:
        """Hyper-parameters that live in modules (again after ``--c``, which restores the checkpoint's values)."""
        self.unwrapped_network().dropout_p = self.hparams["dropout_p"]
        teacher = getattr(self, "teacher", None)
        if teacher is not None:
            teacher.module.dropout_p = self.hparams["dropout_p"]

    def load_extra_checkpoint_state(self, state: dict) -> None:
        super().load_extra_checkpoint_state(state)
        self.apply_method_hparams()

    # ---------------------------------------------------------------- helpers
    @property
    def regions(self) -> bool:
        return self.label_manager.has_regions

    def ramp(self) -> float:
        """The ramp-up of eq. 7 at the current iteration, in [0, 1]."""
        total = self.num_epochs * self.num_iterations_per_epoch
        return rampup(self.hparams["rampup"], self.global_step, round(self.hparams["rampup_fraction"] * total))

    def split_target(self, target) -> tuple:
        """(segmentation target as nnU-Net's loss takes it, signed distance target or None)."""
        sdf = None
        if self.regression_head:
            *target, sdf = target
        return (target if self.enable_deep_supervision else target[0]), sdf

    def full_resolution(self, output):
        return output[0] if self.enable_deep_supervision else output

    def supervised_loss(self, output, seg_target, num_labeled: int) -> torch.Tensor:
        """nnU-Net's Dice + CE (Dice + BCE for regions; deep supervision; ignore label) on the labeled part."""
        if self.enable_deep_supervision:
            return self.loss([o[:num_labeled] for o in output], seg_target)
        return self.loss(output[:num_labeled], seg_target)

    def annotated(self, seg_target) -> torch.Tensor | None:
        """False where the full-resolution label is the ignore label ((B, 1, ...)); None without one."""
        if not self.label_manager.has_ignore_label:
            return None
        full = self.full_resolution(seg_target)
        if self.regions:
            return ~full[:, -1:].bool()
        return full != self.label_manager.ignore_label


class MeanTeacherTrainer(TeacherMixin, ConsistencyTrainerBase):
    hparam_spec: ClassVar[dict[str, HParam]] = MEAN_TEACHER_HPARAMS
    extra_log_keys: ClassVar[tuple[str, ...]] = ("loss_supervised", "loss_consistency", "consistency_weight")

    def mc_passes(self) -> int:
        return 1  # the mean teacher's target is one stochastic pass

    def teacher_prediction(self, x: torch.Tensor) -> MCPrediction:
        """The teacher's stochastic passes on ``x`` plus clipped Gaussian noise (no gradient): p-hat over the
        passes, and the probabilities and signed distance maps of one pass (the consistency targets)."""
        h = self.hparams
        noise = (torch.randn_like(x) * h["teacher_noise_std"]).clamp(-h["teacher_noise_clip"], h["teacher_noise_clip"])
        return self.teacher.module.mc_predict(x + noise, self.mc_passes(), partial(probabilities, regions=self.regions))

    def teacher_consistency(self, student_logits: torch.Tensor,
                            teacher: MCPrediction) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return self.consistency_term(student_logits, teacher), {}

    def consistency_term(self, student_logits: torch.Tensor, teacher: MCPrediction,
                         mask: torch.Tensor | None = None) -> torch.Tensor:
        """``consistency_loss``'s term between the student's full-resolution logits and the teacher's pass."""
        if self.hparams["consistency_loss"] == "pseudo_label":
            return pseudo_label_consistency(student_logits, teacher.probs, self.hparams["confidence_threshold"],
                                            self.regions, mask)
        return mean_teacher_consistency(probabilities(student_logits, self.regions), teacher.probs, mask)

    def student_input(self, x: torch.Tensor, num_labeled: int) -> torch.Tensor:
        """The student's batch: ``x`` (labeled patches, then unlabeled ones) with each unlabeled patch, with
        probability ``student_gamma``, through nnU-Net's gamma transform, then, with probability
        ``student_intensity``, through DA5's intensity transforms (the teacher sees ``x`` itself)."""
        p_gamma, p_intensity = self.hparams["student_gamma"], self.hparams["student_intensity"]
        if p_gamma == 0 and p_intensity == 0:
            return x
        x = x.clone()  # the transforms work in place
        n_u = len(x) - num_labeled
        for i in _drawn(n_u, p_gamma):
            x[num_labeled + i] = STUDENT_GAMMA(image=x[num_labeled + i])["image"]
        if p_intensity > 0:
            for i in _drawn(n_u, p_intensity):
                # on the CPU, where nnU-Net's augmentation runs (some transforms make their fields there)
                patch = x[num_labeled + i].detach().cpu()
                x[num_labeled + i] = self.student_intensity_transforms(image=patch)["image"].to(x.device)
        return x

    @cached_property
    def student_intensity_transforms(self) -> ComposeTransforms:
        """``student_intensity``'s pipeline for this configuration's patch size (built at first use)."""
        dummy_2d = self.configure_rotation_dummyDA_mirroring_and_inital_patch_size()[1]
        return da5_intensity_transforms(self.configuration_manager.patch_size, dummy_2d)

    def compute_losses(self, data, target, data_unlabeled):
        n_l = data.shape[0]
        x = torch.cat((data, data_unlabeled))
        images = _images(self.hparams["consistency_on"], n_l)
        teacher = self.teacher_prediction(x[images])  # first: its memory is freed before the student's
        output = self.network(self.student_input(x, n_l))
        seg_target, _ = self.split_target(target)
        supervised = self.supervised_loss(output, seg_target, n_l)
        consistency, extra = self.teacher_consistency(self.full_resolution(output)[images].float(), teacher)
        weight = self.unsupervised_weight()
        return {"loss": supervised + weight * consistency, "loss_supervised": supervised,
                "loss_consistency": consistency, **extra, "consistency_weight": torch.tensor(weight)}


class UAMTTrainer(MeanTeacherTrainer):
    hparam_spec: ClassVar[dict[str, HParam]] = UAMT_HPARAMS
    extra_log_keys: ClassVar[tuple[str, ...]] = ("loss_supervised", "loss_consistency", "certain_fraction",
                                                 "consistency_weight")

    def mc_passes(self) -> int:
        return self.hparams["mc_passes"]

    def training_advice(self) -> list[str | None]:
        return [*super().training_advice(), mc_passes_advice(self.hparams["dropout_p"], self.hparams["mc_passes"])]

    def certainty(self, teacher: MCPrediction) -> torch.Tensor:
        """I(u < u_th) from p-hat, the teacher's mean probabilities (eq. 3; threshold ramped as in UA-MT)."""
        num_classes = 2 if self.regions else self.label_manager.num_segmentation_heads
        return certainty_mask(predictive_entropy(teacher.mean_probs, self.regions),
                              uncertainty_threshold(self.ramp(), num_classes))

    def teacher_consistency(self, student_logits, teacher):
        mask = self.certainty(teacher)
        return self.consistency_term(student_logits, teacher, mask), {"certain_fraction": mask.mean()}


class SignedDistanceMixin:
    """The regression head, signed distance targets (in the augmentation workers) and their losses."""

    regression_head: ClassVar[bool] = True  # read by ConsistencyTrainerBase.build_network_architecture

    def signed_distance_transform(self) -> SignedDistanceTransform:
        lm = self.label_manager
        return SignedDistanceTransform(None if lm.has_regions else lm.all_labels, lm.ignore_label,
                                       self.configuration_manager.spacing)

    def get_dataloaders(self):
        # nnU-Net builds the labeled training pipeline inside get_dataloaders; only that one gets the targets
        self._labeled_pipeline = True
        try:
            return super().get_dataloaders()
        finally:
            self._labeled_pipeline = False

    def get_training_transforms(self, patch_size, rotation_for_DA, deep_supervision_scales, mirror_axes,
                                do_dummy_2d_data_aug, use_mask_for_norm=None, is_cascaded=False, foreground_labels=None,
                                regions=None, ignore_label=None):
        transforms = super().get_training_transforms(
            patch_size, rotation_for_DA, deep_supervision_scales, mirror_axes, do_dummy_2d_data_aug,
            use_mask_for_norm=use_mask_for_norm, is_cascaded=is_cascaded, foreground_labels=foreground_labels,
            regions=regions, ignore_label=ignore_label)
        if getattr(self, "_labeled_pipeline", False):
            transforms.transforms.append(self.signed_distance_transform())
        return transforms

    def dual_task_supervised(self, output, sdf, target, num_labeled: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(nnU-Net's Dice + CE, L_dis) of eq. 2 on the labeled part."""
        seg_target, sdf_target = self.split_target(target)
        seg_loss = self.supervised_loss(output, seg_target, num_labeled)
        sdf_loss = sdf_regression_loss(sdf[:num_labeled], sdf_target, self.annotated(seg_target))
        return seg_loss, sdf_loss

    def cross_task_weight(self) -> float:
        return self.hparams["cross_task_weight"] * self.ramp()


class DTCTrainer(SignedDistanceMixin, ConsistencyTrainerBase):
    hparam_spec: ClassVar[dict[str, HParam]] = DTC_HPARAMS
    unsupervised_weights: ClassVar[tuple[str, ...]] = ("cross_task_weight",)  # on every image by default
    extra_log_keys: ClassVar[tuple[str, ...]] = ("loss_supervised", "loss_sdf", "loss_cross_task",
                                                 "cross_task_weight")

    def compute_losses(self, data, target, data_unlabeled):
        n_l = data.shape[0]
        x = torch.cat((data, data_unlabeled))
        n, p = len(x), self.hparams["cross_view_gamma"]
        copied = [] if p == 0 else [n_l + i for i in _drawn(n - n_l, p)]  # no draw at 0: the paper's random stream
        if copied:  # the gamma views go through the network in the same call, after the batch
            x = torch.cat((x, torch.stack([STUDENT_GAMMA(image=x[i].clone())["image"] for i in copied])))
        output, sdf = self.network(x, return_sdf=True)
        seg_loss, sdf_loss = self.dual_task_supervised(output, sdf, target, n_l)
        seg_index = sdf_index = _images(self.hparams["cross_task_on"], n_l)  # the paper's pairs: slices, no copy
        if copied:
            seg_index, sdf_index = cross_view_pairs(range(n)[seg_index], copied, n)
        probs = probabilities(self.full_resolution(output)[seg_index].float(), self.regions)
        cross = cross_task_consistency(probs, sdf[sdf_index], self.hparams["sdf_k"])
        weight = self.cross_task_weight()
        total = total_objective(supervised_objective(seg_loss, sdf_loss, self.hparams["sdf_weight"]), None, cross,
                                0.0, weight)
        return {"loss": total, "loss_supervised": seg_loss, "loss_sdf": sdf_loss, "loss_cross_task": cross,
                "cross_task_weight": torch.tensor(weight)}


class UGMCLTrainer(SignedDistanceMixin, UAMTTrainer):
    hparam_spec: ClassVar[dict[str, HParam]] = UGMCL_HPARAMS
    unsupervised_weights: ClassVar[tuple[str, ...]] = ("consistency_weight", "cross_task_weight")
    extra_log_keys: ClassVar[tuple[str, ...]] = ("loss_supervised", "loss_sdf", "loss_intra_task", "loss_cross_task",
                                                 "certain_fraction", "consistency_weight", "cross_task_weight")

    def compute_losses(self, data, target, data_unlabeled):
        h = self.hparams
        n_l = data.shape[0]
        x = torch.cat((data, data_unlabeled))
        intra = _images(h["consistency_on"], n_l)
        teacher = self.teacher_prediction(x[intra])  # before the student: see MeanTeacherTrainer
        mask = self.certainty(teacher)
        output, sdf = self.network(self.student_input(x, n_l), return_sdf=True)
        seg_loss, sdf_loss = self.dual_task_supervised(output, sdf, target, n_l)
        probs = probabilities(self.full_resolution(output).float(), self.regions)

        itc = intra_task_consistency(probs[intra], teacher.probs, sdf[intra], teacher.sdf, mask, h["beta"])
        cross = _images(h["cross_task_on"], n_l)
        ctc = cross_task_consistency(probs[cross], sdf[cross], h["sdf_k"])

        w_i, w_c = self.unsupervised_weight(), self.cross_task_weight()
        total = total_objective(supervised_objective(seg_loss, sdf_loss, h["sdf_weight"]), itc, ctc, w_i, w_c)
        return {"loss": total, "loss_supervised": seg_loss, "loss_sdf": sdf_loss, "loss_intra_task": itc,
                "loss_cross_task": ctc, "certain_fraction": mask.mean(), "consistency_weight": torch.tensor(w_i),
                "cross_task_weight": torch.tensor(w_c)}
