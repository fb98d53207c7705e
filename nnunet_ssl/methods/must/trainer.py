"""``MuSTTrainer``: multi-scale consistency training (MuST) on nnU-Net's planned U-Net.

Per iteration, labeled and unlabeled patches go through the network in one call: the clean (teacher) decoder
gives the deep-supervision outputs for nnU-Net's Dice + CE on the labeled part (eq. 4) and, sharpened (eq. 2),
the targets for the perturbed (student) decoder passes on the unlabeled part (eq. 3); the total is eq. 5 with
w_u ramped linearly from 0 (section 3.2). Defaults are the paper's WMH setting (T = 0.8) except w_u: 3, not 30, since
with nnU-Net's Dice + CE the paper's 30 pulled unfamiliar images towards background (README, docs/benchmarks.md).
``target_alignment`` (not in the paper, off by default) aligns the teacher's targets to the labeled cases' label
shares before sharpening (ReMixMatch's distribution alignment, ``training/distribution.py``).
"""

from __future__ import annotations

from typing import ClassVar

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager
from torch import nn

from nnunet_ssl.methods.must.losses import multiscale_consistency_loss, probabilities, semi_supervised_objective
from nnunet_ssl.methods.must.network import MuSTNetwork
from nnunet_ssl.methods.must.perturbation import PerturbationConfig
from nnunet_ssl.training.base import SSL_HPARAMS, TARGET_ALIGNMENT_HPARAM, SemiSupervisedTrainer
from nnunet_ssl.training.hparams import HParam
from nnunet_ssl.training.supervised import CUDA

MUST_HPARAMS: dict[str, HParam] = {
    **SSL_HPARAMS,
    "temperature": HParam(0.8, float, "Sharpening temperature T of the teacher probabilities (eq. 2).",
                          low=0.05, high=10.0),
    "consistency_weight": HParam(3.0, float, "Final weight w_u of the multi-scale consistency loss (eq. 5); the "
                                 "paper's WMH value is 30.",
                                 low=0.0),
    "scale_reduction": HParam("mean", str, "How eq. 3 combines the decoder scales: 'sum' as written, 'mean' "
                              "(sum / number of scales) to match nnU-Net's deep-supervision weights, which sum to 1 "
                              "where the paper's eq. 4 sums its scales.", choices=("mean", "sum"),
                              legacy="sum"),
    "rampup": HParam("linear", str, "Ramp-up of w_u from 0 (the paper's is linear).", choices=("linear", "sigmoid")),
    "uniform_noise_range": HParam(0.3, float, "SPM uniform noise: x * (1 + U(-r, r)).", low=0.0, high=1.0),
    "gaussian_noise_std": HParam(0.2, float, "SPM Gaussian noise: x * (1 + N(0, std^2)).", low=0.0, high=1.0),
    "feature_drop_low": HParam(0.7, float, "SPM feature dropout: lower bound of the threshold fraction.",
                               low=0.0, high=1.0),
    "feature_drop_high": HParam(0.9, float, "SPM feature dropout: upper bound of the threshold fraction.",
                                low=0.0, high=1.0),
    "spatial_dropout_p": HParam(0.3, float, "SPM spatial dropout: probability of dropping a channel.",
                                low=0.0, high=0.95),
    "target_alignment": TARGET_ALIGNMENT_HPARAM,  # on the teacher's probabilities, before eq. 2's sharpening
}


class MuSTTrainer(SemiSupervisedTrainer):
    hparam_spec: ClassVar[dict[str, HParam]] = MUST_HPARAMS
    extra_log_keys: ClassVar[tuple[str, ...]] = ("loss_supervised", "loss_consistency", "consistency_weight")

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = CUDA):
        super().__init__(plans, configuration, fold, dataset_json, device)
        h = self.hparams
        if h["feature_drop_low"] > h["feature_drop_high"]:
            raise ValueError(f"feature_drop_low ({h['feature_drop_low']}) must not exceed feature_drop_high "
                             f"({h['feature_drop_high']}); fix nnUNet_ssl_hparams.")

    @staticmethod
    def build_network_architecture(plans_manager: PlansManager, configuration_manager: ConfigurationManager,
                                   num_input_channels: int, num_output_channels: int,
                                   enable_deep_supervision: bool = True) -> nn.Module:
        return MuSTNetwork(nnUNetTrainer.build_network_architecture(
            plans_manager, configuration_manager, num_input_channels, num_output_channels, enable_deep_supervision))

    def initialize(self):
        super().initialize()
        h = self.hparams
        self.unwrapped_network().perturbation = PerturbationConfig(
            h["uniform_noise_range"], h["gaussian_noise_std"], h["feature_drop_low"], h["feature_drop_high"],
            h["spatial_dropout_p"])

    def compute_losses(self, data, target, data_unlabeled):
        n_l, n_u = data.shape[0], data_unlabeled.shape[0]
        teacher, student = self.network(torch.cat((data, data_unlabeled)), num_perturbed=n_u)
        labeled_out = [t[:n_l] for t in teacher]
        supervised = self.loss(labeled_out if self.enable_deep_supervision else labeled_out[0], target)
        ratio = None
        if self.hparams["target_alignment"]:  # from the teacher's full-resolution probabilities
            ratio = self.update_alignment(probabilities(teacher[0][n_l:].detach().float(), regions=False))
        consistency = multiscale_consistency_loss([t[n_l:] for t in teacher], student, self.hparams["temperature"],
                                                  self.label_manager.has_regions, self.hparams["scale_reduction"],
                                                  ratio)
        weight = self.unsupervised_weight()
        return {
            "loss": semi_supervised_objective(supervised, consistency, weight),
            "loss_supervised": supervised,
            "loss_consistency": consistency,
            "consistency_weight": torch.tensor(weight),
        }
