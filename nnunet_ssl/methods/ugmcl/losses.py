"""UG-MCL's losses as pure functions (equation numbers of the UG-MCL paper), and the mean-teacher consistency
terms of the baselines built from the same parts.

Squared norms ||a - b||^2 over the channel axis are averaged over channels (as the reference implementations
of UA-MT and UG-MCL do), so a value does not grow with the number of classes; for one channel it is eq. 4 and
eq. 6 verbatim. All losses are computed in float32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def masked_mean_squared_error(student: torch.Tensor, teacher: torch.Tensor,
                              mask: torch.Tensor | None = None) -> torch.Tensor:
    """sum I * ||student - teacher||^2 / sum I over voxels (channels averaged); ``mask`` (B, 1 or C, ...)
    broadcasts over channels; None: the plain mean. The teacher is a target (no gradient). An empty mask
    gives 0."""
    sq = (student.float() - teacher.detach().float()).square()
    if mask is None:
        return sq.mean()
    mask = mask.float().expand_as(sq)
    return (mask * sq).sum() / mask.sum().clamp_min(1.0)


def sdf_regression_loss(pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Eq. 2, L_dis(f_dis, T(y)): mean squared error between the regression output (tanh) and the normalised
    signed distance maps of the labels, over annotated voxels (``valid``, (B, 1, ...): False where the label
    is the ignore label)."""
    return masked_mean_squared_error(pred, target, valid)


def supervised_objective(seg_loss: torch.Tensor, sdf_loss: torch.Tensor, sdf_weight: float = 1.0) -> torch.Tensor:
    """Eq. 2: L_sup = L_dice + L_ce + L_dis (``seg_loss`` is nnU-Net's Dice + CE with deep supervision)."""
    return seg_loss + sdf_weight * sdf_loss


def intra_task_consistency(seg_student: torch.Tensor, seg_teacher: torch.Tensor, sdf_student: torch.Tensor,
                           sdf_teacher: torch.Tensor, mask: torch.Tensor | None, beta: float) -> torch.Tensor:
    """Eq. 4: beta * sum I(u < u_th) ||f_seg - f'_seg||^2 / sum I + (1 - beta) * the same for f_dis.
    ``seg_*`` are probabilities, ``sdf_*`` regression outputs, ``mask`` the certainty mask I(u < u_th)."""
    return (beta * masked_mean_squared_error(seg_student, seg_teacher, mask)
            + (1.0 - beta) * masked_mean_squared_error(sdf_student, sdf_teacher, mask))


def inverse_sdf_transform(sdf: torch.Tensor, k: float) -> torch.Tensor:
    """Eq. 5: T^-1(z) = 1 / (1 + exp(-k z)), a smooth approximation of the mask from a signed distance map
    whose object is negative; the reference implementations apply it as sigmoid(-k z), which is what gives
    probability 1 inside the object. We use that sign (eq. 1 makes the inside negative)."""
    return torch.sigmoid(-k * sdf.float())


def cross_task_consistency(seg_probs: torch.Tensor, sdf: torch.Tensor, k: float) -> torch.Tensor:
    """Eq. 6: ||f_seg - T^-1(f_dis)||^2 (mean over voxels and channels; gradient reaches both branches)."""
    return (seg_probs.float() - inverse_sdf_transform(sdf, k)).square().mean()


def mean_teacher_consistency(student_probs: torch.Tensor, teacher_probs: torch.Tensor,
                             mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean teacher (Tarvainen & Valpola 2017): MSE between student and teacher probabilities; with the
    certainty mask it is UA-MT's consistency (Yu et al. 2019) and the segmentation half of eq. 4."""
    return masked_mean_squared_error(student_probs, teacher_probs, mask)


def pseudo_label_consistency(student_logits: torch.Tensor, teacher_probs: torch.Tensor, threshold: float,
                             regions: bool, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Not in the papers: FixMatch's unlabeled loss (Sohn et al. 2020, l_u = mean of 1(max q >= tau) H(q-hat, p))
    per voxel, with the teacher's probabilities as q. Softmax: cross-entropy of the student's logits against the
    teacher's argmax, counted where the teacher's largest probability reaches ``threshold``. Regions: binary
    cross-entropy per region channel against the teacher's p > 0.5, counted where max(p, 1 - p) reaches it. The sum
    is divided by every voxel (and channel), not by the confident ones, as FixMatch divides by all unlabeled
    images. ``mask`` (UA-MT's certainty, (B, 1 or C, ...)) multiplies in. Computed from logits in float32, so a
    confidently wrong student still gets a gradient (an MSE on probabilities saturates there)."""
    logits, target = student_logits.float(), teacher_probs.detach().float()
    if regions:
        hard = target > 0.5
        confidence = torch.where(hard, target, 1 - target)
        loss = F.binary_cross_entropy_with_logits(logits, hard.float(), reduction="none")
    else:
        confidence, hard = target.max(1, keepdim=True)
        loss = F.cross_entropy(logits, hard[:, 0], reduction="none")[:, None]
    keep = (confidence >= threshold).float()
    if mask is not None:
        keep = keep * mask.float()
    return (keep * loss).mean()


def total_objective(supervised: torch.Tensor, intra_task: torch.Tensor | None, cross_task: torch.Tensor | None,
                    weight_intra: float, weight_cross: float) -> torch.Tensor:
    """Eq. 7: L_sup + lambda_i L_itc + lambda_c L_ctc (a missing term is left out)."""
    total = supervised
    if intra_task is not None:
        total = total + weight_intra * intra_task
    if cross_task is not None:
        total = total + weight_cross * cross_task
    return total
