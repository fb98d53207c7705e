"""POPCORN's losses as pure functions (equation numbers of the POPCORN paper, section 2.2).

A batch holds pairs of patches in consecutive positions (2k, 2k + 1) (see ``sampling.PairedDataLoader``); a
trailing unpaired sample (odd batch size) takes part in the segmentation loss only.
"""

from __future__ import annotations

import torch


def latent_distance(h_i: torch.Tensor, h_j: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Eq. 4 per pair: Distance(h_i, h_j) = 2 ||h_i - h_j||^2 / (||h_i||^2 + ||h_j||^2), the norms over each
    sample's whole bottleneck feature map (channels and positions). Inputs (P, ...), output (P,), in fp32;
    ``eps`` keeps two all-zero maps at distance 0. The value lies in [0, 4]."""
    a = h_i.float().flatten(1)
    b = h_j.float().flatten(1)
    return 2 * (a - b).pow(2).sum(1) / (a.pow(2).sum(1) + b.pow(2).sum(1) + eps)


def label_similarity(y_i: torch.Tensor, y_j: torch.Tensor, annotated: torch.Tensor | None = None) -> torch.Tensor:
    """Eq. 3 per pair: Similarity(y_i, y_j) = exp(-mse(y_i, y_j)) on one-hot labels (P, C, *spatial), the mean
    over channels and voxels. With an annotation mask (P, 1, *spatial), true where *both* labels are annotated
    (ignore label), only those voxels count; a pair without one has similarity 0 (nothing says they agree)."""
    sq = (y_i.float() - y_j.float()).pow(2)
    if annotated is None:
        return torch.exp(-sq.flatten(1).mean(1))
    counted = annotated.flatten(1).sum(1) * sq.shape[1]
    mse = (sq * annotated).flatten(1).sum(1) / counted.clamp_min(1)
    return torch.where(counted > 0, torch.exp(-mse), torch.zeros_like(mse))


def pair_similarity(target: torch.Tensor, num_classes: int, regions: bool,
                    ignore_label: int | None) -> torch.Tensor:
    """Eq. 3 for the pairs (2k, 2k + 1) of a batch, from nnU-Net's full-resolution training target:

    - labels: ``target`` (B, 1, *spatial) of label values; y is their one-hot encoding over the ``num_classes``
      outputs (background included). Two one-hot vectors differ by 2 in squared norm when the labels differ, so
      mse = 2 #(voxels with different labels) / (num_classes #voxels), without building the one-hot maps;
    - regions: ``target`` (B, R, *spatial) of binary region channels (nnU-Net's region conversion), with the
      ignore mask as an extra last channel when the dataset has an ignore label; y is the R region channels.

    Voxels carrying the ignore label in either patch are left out (see ``label_similarity``). No gradient."""
    n = target.shape[0] // 2
    a, b = target[0:2 * n:2], target[1:2 * n:2]
    with torch.no_grad():
        if regions:
            if ignore_label is None:
                return label_similarity(a, b)
            return label_similarity(a[:, :-1], b[:, :-1], (a[:, -1:] == 0) & (b[:, -1:] == 0))
        a, b = a[:, :1], b[:, :1]
        differ = (a != b).float()
        if ignore_label is None:
            return torch.exp(-2 * differ.flatten(1).mean(1) / num_classes)
        annotated = (a != ignore_label) & (b != ignore_label)
        counted = annotated.flatten(1).sum(1) * num_classes
        mse = 2 * (differ * annotated).flatten(1).sum(1) / counted.clamp_min(1)
        return torch.where(counted > 0, torch.exp(-mse), torch.zeros_like(mse))


def bottleneck_consistency_loss(bottleneck: torch.Tensor, similarity: torch.Tensor) -> torch.Tensor:
    """Eq. 2 averaged over the pairs (2k, 2k + 1) of a batch: L_reg = Distance(h_i, h_j) x Similarity(y_i, y_j),
    with ``bottleneck`` h(X) of the batch (B, C, *s) and the pairs' similarities (P,) (a weight computed from
    labels, without gradient)."""
    n = bottleneck.shape[0] // 2
    if n == 0 or similarity.shape[0] != n:
        raise ValueError(f"{bottleneck.shape[0]} patches make {n} pair(s) but {similarity.shape[0]} similarities "
                         f"were given (the bottleneck consistency needs a batch size >= 2)")
    return (latent_distance(bottleneck[0:2 * n:2], bottleneck[1:2 * n:2]) * similarity.detach()).mean()


def popcorn_objective(segmentation: torch.Tensor, regularization: torch.Tensor, alpha: float) -> torch.Tensor:
    """Eq. 5 for a batch of pairs, divided by 2: per pair, L_total = L_seg(i) + L_seg(j) + alpha L_reg. nnU-Net's
    segmentation loss is the mean over the batch, i.e. (L_seg(i) + L_seg(j)) / 2 per pair, so the batch's eq. 5
    is 2 (segmentation + alpha / 2 x regularization); the factor 2 is left out (it would double nnU-Net's
    learning rate), which keeps the paper's balance between the two terms."""
    return segmentation + 0.5 * alpha * regularization
