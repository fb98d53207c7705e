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

All four are a multiplication by a mask. Eagerly, only the drawn mask is computed; under ``torch.compile`` all four
are computed and the draw selects one with ``torch.where``, so the perturbed pass is a single graph whatever is
drawn (no data-dependent Python control flow, no recompilation).
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


def _per_sample_shape(x: torch.Tensor, channels: int) -> tuple[int, ...]:
    return (x.shape[0], channels, *((1,) * (x.ndim - 2)))


def uniform_noise_mask(x: torch.Tensor, cfg: PerturbationConfig) -> torch.Tensor:
    return 1 + (torch.rand_like(x) * 2 - 1) * cfg.uniform_range


def gaussian_noise_mask(x: torch.Tensor, cfg: PerturbationConfig) -> torch.Tensor:
    return 1 + torch.randn_like(x) * cfg.gaussian_std


@torch.no_grad()
def feature_dropout_mask(x: torch.Tensor, cfg: PerturbationConfig) -> torch.Tensor:
    attention = x.mean(1, keepdim=True)
    peak = attention.flatten(1).amax(1).view(_per_sample_shape(x, 1))
    gamma = torch.empty(_per_sample_shape(x, 1), device=x.device, dtype=x.dtype).uniform_(
        cfg.feature_drop_low, cfg.feature_drop_high)
    return (attention < peak * gamma).to(x.dtype)


@torch.no_grad()
def spatial_dropout_mask(x: torch.Tensor, cfg: PerturbationConfig) -> torch.Tensor:
    keep = 1.0 - cfg.spatial_dropout_p
    return torch.bernoulli(torch.full(_per_sample_shape(x, x.shape[1]), keep, device=x.device, dtype=x.dtype)) / keep


MASKS = (uniform_noise_mask, gaussian_noise_mask, feature_dropout_mask, spatial_dropout_mask)


def perturbation_masks(x: torch.Tensor, cfg: PerturbationConfig) -> list[torch.Tensor]:
    """The multiplicative mask of each perturbation, in the order of ``PERTURBATIONS`` (broadcastable to x)."""
    return [mask(x, cfg) for mask in MASKS]


def perturb(x: torch.Tensor, cfg: PerturbationConfig, choice: int | None = None,
            select_by_tensor: bool | None = None) -> torch.Tensor:
    """Apply one perturbation drawn uniformly from ``PERTURBATIONS`` (or the one indexed by ``choice``).
    ``select_by_tensor`` defaults to whether ``torch.compile`` is tracing."""
    if select_by_tensor is None:
        select_by_tensor = torch.compiler.is_compiling()
    if select_by_tensor:
        idx = torch.randint(len(MASKS), (), device=x.device) if choice is None \
            else torch.tensor(choice, device=x.device)
        u, g, f, s = perturbation_masks(x, cfg)
        return x * torch.where(idx == 0, u, torch.where(idx == 1, g, torch.where(idx == 2, f, s)))
    idx = int(torch.randint(len(MASKS), ())) if choice is None else choice  # CPU draw: no device sync
    return x * MASKS[idx](x, cfg)
