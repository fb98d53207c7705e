"""MuST's losses as pure functions (equation numbers of the MuST paper)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from nnunet_ssl.training.distribution import align_foreground


def sharpen(probs: torch.Tensor, temperature: float, dim: int = 1) -> torch.Tensor:
    """Eq. 2: f_j <- f_j^(1/T) / sum_c f_c^(1/T) over the class dimension ``dim`` (softmax outputs)."""
    powered = probs.clamp_min(0).pow(1.0 / temperature)
    return powered / powered.sum(dim, keepdim=True).clamp_min(torch.finfo(powered.dtype).tiny)


def sharpen_regions(probs: torch.Tensor, temperature: float) -> torch.Tensor:
    """Eq. 2 for region-based (sigmoid) outputs: each region channel is a two-class distribution
    (p, 1 - p), sharpened against its complement."""
    pair = torch.stack((probs, 1 - probs), 0)
    return sharpen(pair, temperature, dim=0)[0]


def probabilities(logits: torch.Tensor, regions: bool) -> torch.Tensor:
    """nnU-Net's output nonlinearity: softmax over classes, or sigmoid per region."""
    return torch.sigmoid(logits) if regions else torch.softmax(logits, 1)


def multiscale_consistency_loss(teacher_logits: Sequence[torch.Tensor], student_logits: Sequence[torch.Tensor],
                                temperature: float, regions: bool = False,
                                scale_reduction: str = "mean", alignment: torch.Tensor | None = None) -> torch.Tensor:
    """Eq. 3: d(f_k, f~_k) over decoder scales k, d the mean squared error between the sharpened teacher
    probabilities (eq. 2; targets, no gradient) and the student probabilities, averaged over the unlabeled batch,
    classes and voxels.

    ``scale_reduction="sum"`` is eq. 3 as written. ``"mean"`` divides it by the number of scales: the paper's
    supervised loss (eq. 4) also sums its scales with weight 1, while nnU-Net's deep-supervision loss weights sum
    to 1, so the mean keeps the paper's balance between eq. 3 and eq. 4 in eq. 5 for any number of stages.

    ``alignment`` (not in the paper; softmax only): per-foreground-channel ratios applied to the teacher
    probabilities before eq. 2's sharpening, ReMixMatch's order (``distribution.align_foreground``)."""
    if len(teacher_logits) != len(student_logits):
        raise ValueError(f"{len(teacher_logits)} teacher scales but {len(student_logits)} student scales")
    if scale_reduction not in ("mean", "sum"):
        raise ValueError(f"scale_reduction must be 'mean' or 'sum', got {scale_reduction!r}")
    if alignment is not None and regions:
        raise ValueError("distribution alignment needs softmax outputs; region-based outputs overlap")
    total = student_logits[0].new_zeros((), dtype=torch.float32)
    for t, s in zip(teacher_logits, student_logits):
        with torch.no_grad():
            p_t = probabilities(t.detach().float(), regions)
            if alignment is not None:
                p_t = align_foreground(p_t, alignment)
            target = sharpen_regions(p_t, temperature) if regions else sharpen(p_t, temperature)
        total = total + F.mse_loss(probabilities(s.float(), regions), target)
    return total / len(student_logits) if scale_reduction == "mean" else total


def semi_supervised_objective(supervised: torch.Tensor, consistency: torch.Tensor, weight: float) -> torch.Tensor:
    """Eq. 5: L_semi = L_s + w_u * L_MSC (L_s, eq. 4, is nnU-Net's deep-supervision Dice + CE)."""
    return supervised + weight * consistency
