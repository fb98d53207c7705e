"""``MisMatchTrainer``: learnt morphological feature perturbations (MisMatch) on nnU-Net's planned U-Net.

Per iteration, labeled and unlabeled patches go through the shared encoder and both decoders in one call: nnU-Net's
Dice + CE with deep supervision on each decoder's outputs for the labeled part, and the stop-gradient MSE between
the two decoders' probabilities on the unlabeled part, weighted by alpha ramped up from 0 (section 2.3). At
inference the network returns the mean of the two decoders' probabilities (appendix A) as logits, so
``nnUNetv2_predict`` works unchanged. ``target_alignment`` (not in the paper, off by default) aligns each decoder's
target to the labeled cases' label shares (ReMixMatch's distribution alignment, ``training/distribution.py``).
"""

from __future__ import annotations

from typing import ClassVar

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager
from torch import nn

from nnunet_ssl.methods.mismatch.losses import consistency_loss, mismatch_objective, probabilities, supervised_loss
from nnunet_ssl.methods.mismatch.network import MisMatchNetwork
from nnunet_ssl.training.base import SSL_HPARAMS, TARGET_ALIGNMENT_HPARAM, SemiSupervisedTrainer
from nnunet_ssl.training.hparams import HParam

MISMATCH_HPARAMS: dict[str, HParam] = {
    **SSL_HPARAMS,
    # the paper's alpha = 0.002 weighs a pure Dice loss; against nnU-Net's Dice + CE it leaves the consistency
    # gradient at ~3e-5 of the supervised one, alpha = 10 at 0.14-0.26 (measured, see README)
    "consistency_weight": HParam(10.0, float, "Final weight alpha of the consistency loss between the two "
                                              "decoders (section 2.3; the paper's 0.002 is for a pure Dice loss).",
                                 low=0.0),
    "rampup": HParam("sigmoid", str, "Annealing (ramp-up from 0) of alpha.", choices=("linear", "sigmoid")),
    "target_alignment": TARGET_ALIGNMENT_HPARAM,  # on each decoder's detached target
}


def _scales(outputs) -> list[torch.Tensor]:
    return list(outputs) if isinstance(outputs, (list, tuple)) else [outputs]


class MisMatchTrainer(SemiSupervisedTrainer):
    hparam_spec: ClassVar[dict[str, HParam]] = MISMATCH_HPARAMS
    extra_log_keys: ClassVar[tuple[str, ...]] = ("loss_supervised", "loss_consistency", "consistency_weight")

    @staticmethod
    def build_network_architecture(plans_manager: PlansManager, configuration_manager: ConfigurationManager,
                                   num_input_channels: int, num_output_channels: int,
                                   enable_deep_supervision: bool = True) -> nn.Module:
        return MisMatchNetwork(nnUNetTrainer.build_network_architecture(
            plans_manager, configuration_manager, num_input_channels, num_output_channels, enable_deep_supervision))

    def initialize(self):
        super().initialize()
        # how the two decoders' outputs are averaged (softmax or sigmoid); stored with the weights for the predictor
        self.unwrapped_network().decoder.set_region_based(self.label_manager.has_regions)

    def compute_losses(self, data, target, data_unlabeled):
        n_l = data.shape[0]
        out_d, out_e = (_scales(o) for o in self.network(torch.cat((data, data_unlabeled)), both_decoders=True))
        labeled_d, labeled_e = [o[:n_l] for o in out_d], [o[:n_l] for o in out_e]
        if not self.enable_deep_supervision:
            labeled_d, labeled_e = labeled_d[0], labeled_e[0]
        supervised = supervised_loss(self.loss, labeled_d, labeled_e, target)
        # the consistency acts on the decoders' final (full-resolution) outputs, the ones MisMatch predicts with
        ratio = None
        if self.hparams["target_alignment"]:  # from the prediction MisMatch makes: the decoders' mean probabilities
            ratio = self.update_alignment(0.5 * (probabilities(out_d[0][n_l:].detach(), False)
                                                 + probabilities(out_e[0][n_l:].detach(), False)))
        consistency = consistency_loss(out_d[0][n_l:], out_e[0][n_l:], self.label_manager.has_regions, ratio)
        weight = self.unsupervised_weight()
        return {
            "loss": mismatch_objective(supervised, consistency, weight),
            "loss_supervised": supervised,
            "loss_consistency": consistency,
            "consistency_weight": torch.tensor(weight),
        }
