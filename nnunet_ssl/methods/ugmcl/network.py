"""The dual-task U-Net of UG-MCL (section III-A) on nnU-Net's planned U-Net (PlainConvUNet, ResEnc presets).

``DualTaskUNet`` holds the planned network's ``encoder`` and ``decoder`` under the same names and adds:

- channel dropout (``Dropout2d``/``Dropout3d``, p = 0.5) on the last decoder features, the input of the
  full-resolution heads, as before the output convolution of the V-Net used by UA-MT, DTC and UG-MCL. It is what
  Monte-Carlo dropout samples (eq. 3) and, like in the reference V-Net, it is active in the student's training
  passes too. nnU-Net's plans have no dropout, so the network adds it; a dropout module has no parameters, and
  in eval mode it is off;
- optionally the regression head: a convolution block (conv, norm, nonlinearity as planned, the last decoder
  stage's width) followed by a 1x1 convolution and tanh, one signed distance map per segmentation output
  channel (eq. 1, normalised to [-1, 1]).

Inference (eval mode, ``forward(x)``) is nnU-Net's decoder call on the encoder's skips: the regression head is
not computed and the outputs are the plain U-Net's for the same weights. Without the regression head the state
dict is exactly nnU-Net's.

The teacher's ``mc_predict`` runs T stochastic passes without gradient: everything before the dropout is
deterministic, so it is computed once, and only the dropout and the segmentation head (a 1x1 convolution) run
T times, in one batched product.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from dynamic_network_architectures.building_blocks.simple_conv_blocks import ConvDropoutNormReLU
from torch import nn

from nnunet_ssl.training.network import planned_unet_parts


class MCPrediction(NamedTuple):
    """The teacher's stochastic passes: p-hat (mean probabilities of all passes, for the uncertainty) and the
    probabilities and signed distance maps of the first pass (the consistency targets), float32."""

    mean_probs: torch.Tensor
    probs: torch.Tensor
    sdf: torch.Tensor | None


class DualTaskUNet(nn.Module):
    def __init__(self, unet: nn.Module, regression_head: bool = True, dropout_p: float = 0.5):
        super().__init__()
        self.encoder, self.decoder = planned_unet_parts(unet, "The dual-task network")
        self.dropout_p = dropout_p
        enc = unet.encoder
        self._spatial_dims = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3}[enc.conv_op]
        if regression_head:
            width = enc.output_channels[0]
            self.sdf_head = nn.Sequential(
                ConvDropoutNormReLU(enc.conv_op, width, width, enc.kernel_sizes[0], 1, enc.conv_bias, enc.norm_op,
                                    enc.norm_op_kwargs, None, None, enc.nonlin, enc.nonlin_kwargs),
                enc.conv_op(width, self.decoder.num_classes, 1, 1, 0, bias=True),
                nn.Tanh(),
            )
            if hasattr(type(unet), "initialize"):  # nnU-Net's weight initialisation of the planned network
                self.sdf_head.apply(type(unet).initialize)
        else:
            self.sdf_head = None

    @property
    def has_regression_head(self) -> bool:
        return self.sdf_head is not None

    def dropout(self, x: torch.Tensor) -> torch.Tensor:
        """Channel dropout, always sampled (callers decide when it applies)."""
        if self._spatial_dims == 3:
            return F.dropout3d(x, self.dropout_p, training=True)
        if self._spatial_dims == 2:
            return F.dropout2d(x, self.dropout_p, training=True)
        return F.dropout1d(x, self.dropout_p, training=True)

    def forward(self, x: torch.Tensor, return_sdf: bool = False):
        """Eval mode without ``return_sdf``: nnU-Net's forward. Training mode: dropout before the
        full-resolution heads. With ``return_sdf``: ``(segmentation output(s), signed distance maps)``."""
        skips = self.encoder(x)
        if not self.training and not return_sdf:
            return self.decoder(skips)
        seg, features = self.decode(skips, drop=self.training)
        if not return_sdf:
            return seg
        if self.sdf_head is None:
            raise RuntimeError("this network has no regression head (built with regression_head=False)")
        return seg, self.sdf_head(features)

    def decode(self, skips: list[torch.Tensor], drop: bool, heads: bool = True):
        """nnU-Net's decoder pass (same modules, same order), returning the segmentation output(s) and the last
        decoder features (after dropout when ``drop``). ``heads=False`` skips all segmentation layers."""
        dec = self.decoder
        last = len(dec.stages) - 1
        lres = skips[-1]
        outputs = []
        for s in range(len(dec.stages)):
            x = dec.stages[s](torch.cat((dec.transpconvs[s](lres), skips[-(s + 2)]), 1))
            if s == last and drop:
                x = self.dropout(x)
            if heads and (dec.deep_supervision or s == last):
                outputs.append(dec.seg_layers[s](x))
            lres = x
        if not heads:
            return None, lres
        outputs = outputs[::-1]
        return (outputs if dec.deep_supervision else outputs[0]), lres

    def dropout_masks(self, passes: int, batch: int, channels: int, like: torch.Tensor) -> torch.Tensor:
        """Channel-dropout multipliers per pass, sample and channel: 0 or 1 / (1 - p), as ``dropout`` samples."""
        keep = torch.ones((passes, batch, channels), device=like.device, dtype=torch.float32)
        if self.dropout_p > 0:
            keep.bernoulli_(1.0 - self.dropout_p).div_(1.0 - self.dropout_p)
        return keep

    @torch.no_grad()
    def mc_predict(self, x: torch.Tensor, passes: int,
                   nonlin: Callable[[torch.Tensor], torch.Tensor]) -> MCPrediction:
        """``passes`` stochastic passes without gradient, dropout sampled independently per pass, sample and
        channel. The trunk runs once. The segmentation head is a 1x1 convolution, so a pass with channel mask m
        is the head's weights scaled by m applied to the shared features: all passes in one batched product,
        without copies of the features. The regression head runs for the first pass only."""
        _, features = self.decode(self.encoder(x), drop=False, heads=False)
        batch, channels = features.shape[:2]
        keep = self.dropout_masks(passes, batch, channels, features)
        head = self.decoder.seg_layers[-1]
        weights = head.weight.flatten(1)[None, None] * keep[:, :, None, :]  # (passes, batch, classes, channels)
        logits = torch.einsum("tbkc,bcv->tbkv", weights.to(features.dtype), features.flatten(2))
        logits = logits.float() + head.bias.float()[None, None, :, None]
        probs = nonlin(logits.reshape(passes * batch, -1, *features.shape[2:]))
        probs = probs.view(passes, batch, *probs.shape[1:])
        sdf = None
        if self.sdf_head is not None:
            first = features * keep[0].to(features.dtype).view(batch, channels, *([1] * (features.ndim - 2)))
            sdf = self.sdf_head(first).float()
        return MCPrediction(probs.mean(0), probs[0], sdf)
