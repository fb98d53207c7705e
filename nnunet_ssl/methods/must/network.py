"""MuST's training forward on nnU-Net's planned U-Net (PlainConvUNet, ResEnc presets; 2d and 3d).

``MuSTNetwork`` holds the planned network's ``encoder`` and ``decoder`` under the same names, so its state dict
is exactly nnU-Net's and ``forward(x)`` is exactly nnU-Net's (same weights, same speed at inference). With
``num_perturbed = n > 0`` it runs MuST's training pass (sections 2.1-2.3) in the same call, so DDP and
``torch.compile`` see a single forward:

- teacher: the clean decoder over the whole batch; the clean output of each stage feeds the next stage;
- student: for the last ``n`` samples (the unlabeled ones), every decoder stage runs again, with the same
  weights and the same segmentation head, on z~_k = pi_2(clean features from below), upsampled, || pi_1(skip)
  (eq. 1 with the SPM of section 2.2; pi_2 acts before the stage's transposed convolution, as written there).
"""

from __future__ import annotations

import torch
from torch import nn

from nnunet_ssl.methods.must.perturbation import PerturbationConfig, perturb
from nnunet_ssl.training.network import planned_unet_parts


class MuSTNetwork(nn.Module):
    def __init__(self, unet: nn.Module, perturbation: PerturbationConfig | None = None):
        super().__init__()
        self.encoder, self.decoder = planned_unet_parts(unet, "MuST")
        self.perturbation = perturbation or PerturbationConfig()

    def forward(self, x: torch.Tensor, num_perturbed: int = 0):
        skips = self.encoder(x)
        if num_perturbed == 0:
            return self.decoder(skips)
        return self.must_decoder(skips, num_perturbed)

    def must_decoder(self, skips: list[torch.Tensor], n: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Teacher and student logits at every decoder scale, highest resolution first (nnU-Net's order)."""
        dec = self.decoder
        lres = skips[-1]
        teacher, student = [], []
        for s in range(len(dec.stages)):
            skip = skips[-(s + 2)]
            x = dec.stages[s](torch.cat((dec.transpconvs[s](lres), skip), 1))
            teacher.append(dec.seg_layers[s](x))
            up = dec.transpconvs[s](perturb(lres[-n:], self.perturbation))
            xs = dec.stages[s](torch.cat((up, perturb(skip[-n:], self.perturbation)), 1))
            student.append(dec.seg_layers[s](xs))
            lres = x
        return teacher[::-1], student[::-1]
