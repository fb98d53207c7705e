"""MisMatch's losses as pure functions (section 2.3 of the MisMatch paper, which numbers no equations).

L = L_s(f_d1) + L_s(f_d2) + alpha * L_c

- L_s: the supervised loss on each decoder's output for the labeled images; the paper's Dice loss is nnU-Net's
  Dice + CE with deep supervision here (whatever ``self.loss`` the trainer built, regions and ignore label included).
- L_c: on the unlabeled images, the mean squared error between the two decoders' probabilities, with the gradient
  cut on the target side as in SimSiam: each decoder is pulled toward the other's detached output.
- alpha: the consistency weight, annealed (ramped up) during training.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from nnunet_ssl.training.distribution import align_foreground


def probabilities(logits: torch.Tensor, regions: bool) -> torch.Tensor:
    """nnU-Net's output nonlinearity in fp32: softmax over classes, or sigmoid per region."""
    logits = logits.float()
    return torch.sigmoid(logits) if regions else torch.softmax(logits, 1)


def mse_to_detached(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """MSE(prediction, sg(target)), averaged over batch, channels and voxels; no gradient reaches ``target``."""
    return F.mse_loss(prediction, target.detach())


def consistency_loss(logits_dilation: torch.Tensor, logits_erosion: torch.Tensor, regions: bool = False,
                     alignment: torch.Tensor | None = None) -> torch.Tensor:
    """L_c (section 2.3), symmetrised with stop-gradient as in SimSiam:
    1/2 [MSE(p_d1, sg(p_d2)) + MSE(p_d2, sg(p_d1))], p the probabilities of each decoder's (full-resolution) output.
    Its value equals MSE(p_d1, p_d2); each decoder receives the gradient of one term only.

    ``alignment`` (not in the paper; softmax only): per-foreground-channel ratios applied to both targets
    (``distribution.align_foreground``): 1/2 [MSE(p_d1, sg(a(p_d2))) + MSE(p_d2, sg(a(p_d1)))]."""
    p1 = probabilities(logits_dilation, regions)
    p2 = probabilities(logits_erosion, regions)
    target1, target2 = p2, p1
    if alignment is not None:
        if regions:
            raise ValueError("distribution alignment needs softmax outputs; region-based outputs overlap")
        target1, target2 = align_foreground(p2.detach(), alignment), align_foreground(p1.detach(), alignment)
    return 0.5 * (mse_to_detached(p1, target1) + mse_to_detached(p2, target2))


def supervised_loss(loss_fn: Callable, outputs_dilation: Sequence[torch.Tensor] | torch.Tensor,
                    outputs_erosion: Sequence[torch.Tensor] | torch.Tensor, target) -> torch.Tensor:
    """L_s(f_d1) + L_s(f_d2) (section 2.3: the supervised loss 'with the output of each decoder')."""
    return loss_fn(outputs_dilation, target) + loss_fn(outputs_erosion, target)


def mismatch_objective(supervised: torch.Tensor, consistency: torch.Tensor, alpha: float) -> torch.Tensor:
    """L = L_s(f_d1) + L_s(f_d2) + alpha * L_c."""
    return supervised + alpha * consistency
