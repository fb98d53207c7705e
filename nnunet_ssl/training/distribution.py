"""Distribution alignment of soft consistency targets (Berthelot et al., ReMixMatch, ICLR 2020, section 3.2).

A method whose targets on unlabeled images are the model's own predictions (MuST's sharpened teacher, each of
MisMatch's decoders for the other; ``target_alignment`` in their hyper-parameters, not in the papers) inherits the
model's bias on images unlike the labeled ones: a class it under-predicts there stays under-predicted in the targets,
and the consistency term trains on its absence. ReMixMatch multiplies each target distribution by the ratio of the
labeled class marginal p(y) to a running average of the model's predictions on unlabeled data, then renormalises.

Here the ratio acts among the foreground labels only and keeps each voxel's foreground probability: how much
background a patch holds depends on where the patch lies in the field of view, not on the labeled cases, so only the
split of the foreground between labels is aligned (as ``pseudo_labels.label_share_bias`` does for hard
pseudo-labels). Softmax outputs only: region-based labels overlap and have no split to align.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from typing import Any

import torch
from torch import distributed as dist

# ReMixMatch's running average covers the last 128 batches
REMIXMATCH_WINDOW = 128


def align_foreground(probs: torch.Tensor, ratio: torch.Tensor) -> torch.Tensor:
    """ReMixMatch's distribution alignment on the foreground channels of softmax probabilities ``probs``
    (B, C, *spatial; channel 0 background): per voxel, the foreground mass sum_{c>=1} p_c is kept and split among
    channels 1..C-1 in proportion to p_c * ratio_{c-1}; background unchanged. ``ratio`` (C - 1,) positive: the
    labeled cases' share of each foreground label over the model's running share (``ForegroundShares.ratio``)."""
    if ratio.shape != (probs.shape[1] - 1,):
        raise ValueError(f"ratio has shape {tuple(ratio.shape)}, expected ({probs.shape[1] - 1},): one entry per "
                         f"foreground channel of the {probs.shape[1]}-channel probabilities")
    fg = probs[:, 1:]
    scaled = fg * ratio.to(fg).view(1, -1, *([1] * (probs.dim() - 2)))
    mass = fg.sum(1, keepdim=True)
    aligned = scaled * (mass / scaled.sum(1, keepdim=True).clamp_min(torch.finfo(fg.dtype).tiny))
    return torch.cat((probs[:, :1], aligned), 1)


class ForegroundShares:
    """The model's running share of each foreground channel's probability mass among all foreground mass on
    unlabeled patches, over the last ``window`` batches (ReMixMatch's p~(y), restricted to the foreground), and its
    ratio to the labeled cases' shares. Under DDP each batch's masses are summed over the ranks, so every rank holds
    the same average."""

    def __init__(self, target: Sequence[float], window: int = REMIXMATCH_WINDOW):
        goal = torch.tensor(list(target), dtype=torch.float64)
        if goal.numel() < 1 or (goal < 0).any() or goal.sum() <= 0:
            raise ValueError(f"target shares must be non-negative with a positive sum, got {list(target)}")
        self.goal = goal / goal.sum()
        self.masses: deque[torch.Tensor] = deque(maxlen=window)

    @torch.no_grad()
    def update(self, probs: torch.Tensor) -> None:
        """Add a batch of softmax probabilities (B, C, *spatial; C - 1 = number of target shares)."""
        if probs.shape[1] - 1 != self.goal.numel():
            raise ValueError(f"{probs.shape[1]} channels for {self.goal.numel()} foreground shares")
        mass = probs[:, 1:].double().transpose(0, 1).reshape(self.goal.numel(), -1).sum(1)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(mass)
        self.masses.append(mass.cpu())

    def shares(self) -> torch.Tensor:
        """The running foreground shares (uniform before the first batch or while no foreground was predicted)."""
        total = torch.stack(tuple(self.masses)).sum(0) if self.masses else torch.zeros_like(self.goal)
        if total.sum() <= 0:
            return torch.full_like(self.goal, 1.0 / self.goal.numel())
        return total / total.sum()

    def ratio(self) -> torch.Tensor:
        """p(y) / p~(y) per foreground channel (float32); a share the model never predicts counts as 1e-6."""
        return (self.goal / self.shares().clamp_min(1e-6)).float()

    def state_dict(self) -> dict[str, Any]:
        return {"masses": [m.clone() for m in self.masses], "window": self.masses.maxlen}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.masses = deque((m.double() for m in state["masses"]), maxlen=state["window"])
