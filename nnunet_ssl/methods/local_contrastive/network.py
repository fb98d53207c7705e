"""nnU-Net's planned U-Net (PlainConvUNet, ResEnc presets; 2d and 3d) with the contrastive projection head h_phi.

Section IV.C of the paper: two branches leave the last decoder layer, the segmentation layers g_xi (nnU-Net's
``seg_layers``) and h_phi, two 1x1 convolutions with normalisation and a nonlinearity after the first, giving
D = 16 channels per pixel for the local contrastive loss. ``LocalContrastiveNetwork`` keeps nnU-Net's ``encoder``
and ``decoder`` under their names, so ``forward(x)`` is exactly nnU-Net's (the predictor rebuilds this network
through the trainer's ``build_network_architecture`` and loads the checkpoint strictly; h_phi's weights are in the
state dict and never run at inference). ``forward(x, return_embeddings=True)`` returns the segmentation outputs and
z(x) = h_phi(c_theta(x)) from one pass, so DDP and ``torch.compile`` see a single forward.
"""

from __future__ import annotations

import torch
from torch import nn

from nnunet_ssl.training.network import planned_unet_parts

EMBEDDING_DIM = 16  # D of section IV.E; fixed, since the predictor rebuilds the network without hyper-parameters


class ProjectionHead(nn.Module):
    """h_phi: 1x1 convolution, normalisation, nonlinearity, 1x1 convolution (the planned network's op types), D
    channels each."""

    def __init__(self, conv_op: type[nn.Module], in_channels: int, out_channels: int = EMBEDDING_DIM,
                 conv_bias: bool = True, norm_op: type[nn.Module] | None = None, norm_op_kwargs: dict | None = None,
                 nonlin: type[nn.Module] | None = None, nonlin_kwargs: dict | None = None):
        super().__init__()
        # both layers D wide, as in the paper's code (where D equals the decoder's last width); a wider first layer
        # would cost memory at full resolution for nothing the paper asks for
        self.conv1 = conv_op(in_channels, out_channels, 1, 1, 0, bias=conv_bias)
        self.norm = norm_op(out_channels, **(norm_op_kwargs or {})) if norm_op is not None else nn.Identity()
        self.nonlin = nonlin(**(nonlin_kwargs or {})) if nonlin is not None else nn.Identity()
        self.conv2 = conv_op(out_channels, out_channels, 1, 1, 0, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.nonlin(self.norm(self.conv1(x))))


class LocalContrastiveNetwork(nn.Module):
    def __init__(self, unet: nn.Module, embedding_dim: int = EMBEDDING_DIM):
        super().__init__()
        self.encoder, self.decoder = planned_unet_parts(unet, "LocalContrastiveTrainer")
        enc = unet.encoder
        # the last decoder stage outputs as many channels as the highest-resolution encoder stage
        self.projection_head = ProjectionHead(enc.conv_op, enc.output_channels[0], embedding_dim, enc.conv_bias,
                                              enc.norm_op, enc.norm_op_kwargs, enc.nonlin, enc.nonlin_kwargs)

    def forward(self, x: torch.Tensor, return_embeddings: bool = False):
        skips = self.encoder(x)
        if not return_embeddings:
            return self.decoder(skips)
        seg, features = self.decode_with_features(skips)
        return seg, self.projection_head(features)

    def decode_with_features(self, skips: list[torch.Tensor]):
        """nnU-Net's ``UNetDecoder.forward`` (same outputs for the decoder's ``deep_supervision`` setting) that also
        returns the last stage's features, the input of both g_xi and h_phi."""
        dec = self.decoder
        lres = skips[-1]
        seg = []
        for s in range(len(dec.stages)):
            x = dec.stages[s](torch.cat((dec.transpconvs[s](lres), skips[-(s + 2)]), 1))
            if dec.deep_supervision:
                seg.append(dec.seg_layers[s](x))
            elif s == len(dec.stages) - 1:
                seg.append(dec.seg_layers[-1](x))
            lres = x
        seg = seg[::-1]
        return (seg if dec.deep_supervision else seg[0]), lres
