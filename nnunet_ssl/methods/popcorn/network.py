"""nnU-Net's planned U-Net with access to its bottleneck h(X) (POPCORN section 2.2).

``POPCORNNetwork`` holds the planned network's ``encoder`` and ``decoder`` under the same names, so its state dict
and ``forward(x)`` are exactly nnU-Net's (a POPCORN checkpoint loads into plain ``nnUNetTrainer``'s network; same
speed at inference). ``forward(x, return_bottleneck=True)`` also returns the deepest encoder stage's output, the
feature map the bottleneck consistency (eq. 2-4) and the proximity graph (eq. 6) use, from the same forward pass
(one call, so DDP and ``torch.compile`` see a single forward).
"""

from __future__ import annotations

import torch
from torch import nn

from nnunet_ssl.training.network import planned_unet_parts


class POPCORNNetwork(nn.Module):
    def __init__(self, unet: nn.Module):
        super().__init__()
        self.encoder, self.decoder = planned_unet_parts(unet, "POPCORN")

    def forward(self, x: torch.Tensor, return_bottleneck: bool = False):
        skips = self.encoder(x)
        out = self.decoder(skips)
        return (out, skips[-1]) if return_bottleneck else out

    def bottleneck(self, x: torch.Tensor) -> torch.Tensor:
        """h(X) alone: the encoder without the decoder (for the latent representations of whole images)."""
        return self.encoder(x)[-1]
