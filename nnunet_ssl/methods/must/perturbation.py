"""MuST's stochastic perturbation module (SPM, section 2.2).

Before a decoder stage, the SPM draws with uniform probability one perturbation from
Pi = {uniform noise, Gaussian noise, feature dropout, spatial dropout} for the skip features and, independently,
one for the features coming from the stage below. The paper names the four but gives no magnitudes; ours
follow cross-consistency training (Ouali et al. 2020), which MuST builds on:

- uniform noise: x * (1 + u), u ~ U(-r, r) per element, r = 0.3;
- Gaussian noise: x * (1 + g), g ~ N(0, sigma^2) per element, sigma = 0.2 (scale-free, like the uniform one);
- feature dropout: drop the locations whose channel-mean activation exceeds a random fraction
  gamma ~ U(0.7, 0.9) of the sample's maximum (the most salient regions);
- spatial dropout: drop whole channels with probability p = 0.3 and rescale the rest by 1 / (1 - p).

All four are a multiplication by a mask, so the draw selects a mask with ``torch.where`` instead of Python
control flow: the perturbed pass has one graph for ``torch.compile`` whatever is drawn.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

PERTURBATIONS = ("uniform_noise", "gaussian_noise", "feature_dropout", "spatial_dropout")


@dataclass(frozen=True)
class PerturbationConfig:
    uniform_range: float = 0.3
    gaussian_std: float = 0.2
    feature_drop_low: float = 0.7
    feature_drop_high: float = 0.9
    spatial_dropout_p: float = 0.3


def perturbation_masks(x: torch.Tensor, cfg: PerturbationConfig) -> list[torch.Tensor]:
    """The multiplicative mask of each perturbation, in the order of ``PERTURBATIONS`` (broadcastable to x)."""
    b, c = x.shape[:2]
    singleton = (1,) * (x.ndim - 2)
    uniform = 1 + (torch.rand_like(x) * 2 - 1) * cfg.uniform_range
    gaussian = 1 + torch.randn_like(x) * cfg.gaussian_std
    with torch.no_grad():  # masks are constants of the forward pass
        attention = x.detach().mean(1, keepdim=True)
        peak = attention.flatten(1).amax(1).view(b, 1, *singleton)
        gamma = torch.empty((b, 1, *singleton), device=x.device, dtype=x.dtype).uniform_(
            cfg.feature_drop_low, cfg.feature_drop_high)
        feature = (attention < peak * gamma).to(x.dtype)
        keep = 1.0 - cfg.spatial_dropout_p
        spatial = torch.bernoulli(torch.full((b, c, *singleton), keep, device=x.device, dtype=x.dtype)) / keep
    return [uniform, gaussian, feature, spatial]


def perturb(x: torch.Tensor, cfg: PerturbationConfig, choice: torch.Tensor | None = None) -> torch.Tensor:
    """Apply one perturbation drawn uniformly from ``PERTURBATIONS`` (or the one indexed by ``choice``)."""
    if choice is None:
        choice = torch.randint(len(PERTURBATIONS), (), device=x.device)
    u, g, f, s = perturbation_masks(x, cfg)
    mask = torch.where(choice == 0, u, torch.where(choice == 1, g, torch.where(choice == 2, f, s)))
    return x * mask
