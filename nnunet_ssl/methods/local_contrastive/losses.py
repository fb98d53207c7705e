"""The local (pixel-level) contrastive loss of Chaitanya et al. (paper 004), eq. 2-4, as pure functions.

Notation of the paper: z(x) = h_phi(c_theta(x)) is the D-channel embedding of image x; S_c(x) the pixels of class c
in x; z̄_c(x') the mean embedding of class c over *all* its pixels in x'; sim the cosine similarity; tau the
temperature. Eq. 4 is the probability that pixel embedding [z(x)]_i is matched to its own class mean among the class
means of x'; the loss is its negative log (as for any InfoNCE-type loss),

    L_{i,c} = -log( e^{sim([z(x)]_i, z̄_c(x'))/tau} / (e^{sim(., z̄_c(x'))/tau} + sum_{k != c} e^{sim(., z̄_k(x'))/tau}) ),

averaged over the sampled pixels S~_c(x) of each class, over the classes (eq. 3) and over the image pairs (eq. 2).
Classes are described by a membership mask (B, K, *spatial): pixel n of image b belongs to class k. Labels give
disjoint classes; nnU-Net regions may overlap, and a region that contains the pixel is then neither its positive
nor a negative. Pixels that belong to no class (ignore label, outside the nonzero mask) are never sampled and do not
enter any class mean.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

MATCHINGS = ("intra", "inter")


def sample_anchors(membership: torch.Tensor, num_samples: int,
                   generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """S~_c(x) of section III: ``num_samples`` pixels of every class of every image, drawn uniformly without
    replacement among the pixels of that class (``membership`` (B, K, *spatial), bool).

    Returns flat pixel indices (B, K, num_samples) and their validity: a class with fewer pixels contributes all of
    them and invalid fillers, an absent class only invalid fillers."""
    flat = membership.flatten(2)
    k = min(num_samples, flat.shape[-1])
    with torch.no_grad():
        scores = torch.rand(flat.shape, generator=generator, device=flat.device).masked_fill_(~flat, -1.0)
        top, idx = scores.topk(k, dim=-1)
    valid = top >= 0
    if k < num_samples:  # patches smaller than the sample count (tiny test images)
        pad = num_samples - k
        idx = F.pad(idx, (0, pad))
        valid = F.pad(valid, (0, pad), value=False)
    return idx, valid


def class_means(embeddings: torch.Tensor, membership: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """z̄_k(x) (below eq. 3): the mean embedding over all pixels of class k in image x, (B, K, D) in float32, and
    whether the class is present (B, K). Absent classes get a zero vector."""
    z = embeddings.flatten(2).float()  # (B, D, N)
    member = membership.flatten(2)
    counts = member.sum(-1)
    weights = member.float() / counts.clamp_min(1)[..., None]
    return torch.bmm(weights, z.transpose(1, 2)), counts > 0


def local_contrastive_loss(embeddings: torch.Tensor, membership: torch.Tensor, anchors: torch.Tensor,
                           anchor_valid: torch.Tensor, temperature: float = 0.1,
                           matching: str = "inter") -> torch.Tensor:
    """Eq. 2-4 for a batch: the mean over image pairs (x, x') of eq. 3, whose terms are the negative log of eq. 4.

    - ``embeddings`` z(x), (B, D, *spatial); ``membership`` (B, K, *spatial) bool; ``anchors`` and
      ``anchor_valid`` (B, K, S) from ``sample_anchors``.
    - ``matching="intra"``: x' = x (the class means of the pixel's own image).
      ``matching="inter"``: every x' of the batch, x itself included (section III: positives and negatives "from
      within the same image as well as from different images in the batch").
    - A term needs its class c present in x (a sampled pixel) and in x' (a class mean); negatives are the other
      classes present in x' that do not contain the pixel. Eq. 3's 1/C and 1/|S_c| average over the classes and
      pixels present; pairs without any term are left out; 0 when there is no term at all (always finite).

    Computed in float32 with autocast off: exp(sim / tau) and the class means over many pixels need the range.
    """
    if matching not in MATCHINGS:
        raise ValueError(f"matching must be one of {MATCHINGS}, got {matching!r}")
    with torch.autocast(embeddings.device.type, enabled=False):
        b, d = embeddings.shape[:2]
        k, s = anchors.shape[1:]
        z = embeddings.flatten(2).float()
        member = membership.flatten(2)
        means, present = class_means(z, member)
        idx = anchors.reshape(b, 1, k * s)
        pixels = torch.gather(z, 2, idx.expand(b, d, k * s)).transpose(1, 2).reshape(b, k, s, d)
        # in_class[b, c, i, j]: the i-th pixel sampled for class c also belongs to class j (overlapping regions)
        in_class = torch.gather(member, 2, idx.expand(b, k, k * s)).reshape(b, k, k, s).permute(0, 2, 3, 1)

        pixels, means = F.normalize(pixels, dim=-1), F.normalize(means, dim=-1)  # cosine similarity
        if matching == "intra":
            sim = torch.einsum("bcsd,bjd->bcsj", pixels, means)[:, None] / temperature  # (B, 1, C, S, K)
            partner_present = present[:, None]  # (B, P=1, K)
        else:
            sim = torch.einsum("bcsd,pjd->bpcsj", pixels, means) / temperature  # (B, P=B, C, S, K)
            partner_present = present[None].expand(b, b, k)
        own = torch.eye(k, dtype=torch.bool, device=z.device).view(1, 1, k, 1, k)
        negative = partner_present[:, :, None, None, :] & ~in_class[:, None] & ~own
        positive = (sim * own).sum(-1)
        log_denominator = torch.logsumexp(sim.masked_fill(~(negative | own), float("-inf")), dim=-1)
        terms = log_denominator - positive  # -log eq. 4, (B, P, C, S)

        valid = (anchor_valid[:, None] & partner_present[..., None]).float()
        n_pixels = valid.sum(-1)  # |S~_c(x)| per pair and class
        per_class = (terms * valid).sum(-1) / n_pixels.clamp_min(1)
        has_class = (n_pixels > 0).float()
        n_classes = has_class.sum(-1)
        per_pair = (per_class * has_class).sum(-1) / n_classes.clamp_min(1)  # eq. 3
        has_pair = (n_classes > 0).float()
        return (per_pair * has_pair).sum() / has_pair.sum().clamp_min(1)  # mean over pairs (eq. 2)


def local_contrastive_objective(segmentation_loss: torch.Tensor, contrastive_loss: torch.Tensor,
                                weight: float) -> torch.Tensor:
    """Eq. 2: L_seg on the labeled images + lambda_cont * L_cont on labeled and pseudo-labeled images."""
    return segmentation_loss + weight * contrastive_loss
