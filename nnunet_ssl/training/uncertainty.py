"""Monte-Carlo predictive uncertainty of segmentation outputs (Yu et al. 2019, UA-MT; UG-MCL eq. 3).

Softmax outputs: the entropy of the class distribution averaged over the stochastic passes, one value per voxel,
compared with a threshold ramped from 0.75 ln C to ln C (C classes, ln C the largest possible entropy).
Region-based (sigmoid) outputs: every region is a two-class problem (p, 1 - p), so entropy and threshold
(ln 2) are per region channel.
"""

from __future__ import annotations

import math

import torch


def probabilities(logits: torch.Tensor, regions: bool, dim: int = 1) -> torch.Tensor:
    """nnU-Net's output nonlinearity: softmax over classes, or sigmoid per region."""
    return torch.sigmoid(logits) if regions else torch.softmax(logits, dim)


def predictive_entropy(probs: torch.Tensor, regions: bool) -> torch.Tensor:
    """Eq. 3, u = -sum_i p-hat_i ln p-hat_i over the classes (dim 1, kept: (B, 1, ...)); for regions the
    binary entropy of every region channel ((B, R, ...)). 0 ln 0 counts as 0."""
    probs = probs.float()
    if regions:
        return -(torch.special.xlogy(probs, probs) + torch.special.xlogy(1 - probs, 1 - probs))
    return -torch.special.xlogy(probs, probs).sum(1, keepdim=True)


def uncertainty_threshold(ramp: float, num_classes: int) -> float:
    """u_th = (0.75 + 0.25 ramp) ln C (UA-MT); ``num_classes`` = 2 for region channels."""
    return (0.75 + 0.25 * ramp) * math.log(num_classes)


def certainty_mask(entropy: torch.Tensor, threshold: float) -> torch.Tensor:
    """I(u < u_th) as a float mask."""
    return (entropy < threshold).float()
