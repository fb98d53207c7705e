"""MisMatch's network on nnU-Net's planned U-Net (PlainConvUNet, ResEnc presets; 2d and 3d; any number of stages).

One shared encoder (the planned one, as is) and two decoders with the planned ``UNetDecoder``'s shape (transposed
convolutions, stages, segmentation heads, deep supervision):

- decoder f_d1 (``decoder.dilation``): every stage is a positive attention shifting block (PASB, section 2.1);
- decoder f_d2 (``decoder.erosion``): every stage is a negative attention shifting block (NASB, section 2.2).

A block's main branch is the planned decoder stage (its ``StackedConvBlocks``). Its side branch sees the same input
(upsampled features concatenated with the skip) and ends in a sigmoid: the attention mask m in (0, 1), multiplied
into the main branch output f, then the skip connection: out = f * m + f.

- PASB side branch: two atrous convolutions (kernel 3 where the plan has 3, dilation 5), each followed by the
  nonlinearity and the normalisation (the paper's order), then the sigmoid. The large receptive field spreads the
  foreground response outwards: learnt dilation.
- NASB side branch: two convolutions of the planned kernel, each followed by the nonlinearity and the normalisation
  and with a residual connection around it (added before the normalisation; a 1x1 projection where the channel
  count changes), then the sigmoid.
  Residual connections shrink the effective receptive field: learnt erosion.

The side branches are narrow (``side_reduction``: hidden width = stage channels / 8) and end in a one-channel mask,
the per-voxel magnitude of the feature change (section 2.1), broadcast over the main branch's channels. The paper
gives no widths; two decoders already cost about 1.7x a plain nnU-Net's prediction, and the side branches must fit
in what is left of a 2x budget (full-width ones would bring it to 3x).

``forward(x)`` returns what nnU-Net expects of a network: the prediction of MisMatch (appendix A: the average of
the two decoders' outputs) as logits whose softmax (or, for region-based datasets, sigmoid) is exactly the mean of
the two decoders' probabilities; a list over deep-supervision scales when ``decoder.deep_supervision`` is on.
``forward(x, both_decoders=True)`` returns both decoders' outputs for training.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from dynamic_network_architectures.building_blocks.helper import maybe_convert_scalar_to_list
from torch import nn

from nnunet_ssl.training.network import planned_unet_parts

DILATION = 5  # section 2.1


# ---------------------------------------------------------------- prediction: the mean of the two decoders
def mean_softmax_logits(a: torch.Tensor, b: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """log((softmax(a) + softmax(b)) / 2), in fp32 and in log space (no overflow, no log(0)): its softmax is exactly
    the mean of the two probability maps, since they sum to one."""
    both = torch.stack((F.log_softmax(a.float(), dim), F.log_softmax(b.float(), dim)))
    return torch.logsumexp(both, 0) - math.log(2.0)


def mean_sigmoid_logits(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """logit((sigmoid(a) + sigmoid(b)) / 2) = log(m) - log(1 - m), both terms in log space from log-sigmoids (fp32;
    exact also where m is within rounding of 0 or 1, where a clamp would distort it)."""
    a, b = a.float(), b.float()
    log_m = torch.logsumexp(torch.stack((F.logsigmoid(a), F.logsigmoid(b))), 0)
    log_1m = torch.logsumexp(torch.stack((F.logsigmoid(-a), F.logsigmoid(-b))), 0)
    return log_m - log_1m


def mean_probability_logits(a: torch.Tensor, b: torch.Tensor, regions: bool) -> torch.Tensor:
    return mean_sigmoid_logits(a, b) if regions else mean_softmax_logits(a, b)


# ---------------------------------------------------------------- attention shifting blocks
def side_conv(conv: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``conv(x)``, on the CPU always with oneDNN. PyTorch's CPU dispatcher sends a convolution of a single image whose
    batch x channels x first two spatial sizes are at most 20480 to its native im2col kernels instead (a heuristic
    for tiny inputs), which the narrow side branches hit in nnU-Net's one-patch-at-a-time prediction (measured, one
    48^3 patch through the network on 2 CPU threads: 0.54 s that way, 0.49 s with oneDNN; a plain U-Net 0.25 s).
    Same arithmetic and autograd either way; GPUs, other dtypes and torch.compile take the ordinary path."""
    if not torch.compiler.is_compiling() and x.device.type == "cpu" and x.dtype == torch.float32 and \
            x.shape[0] == 1 and torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled:
        return torch.ops.aten.mkldnn_convolution(x, conv.weight, conv.bias, conv.padding, conv.stride, conv.dilation,
                                                 conv.groups)
    return conv(x)


class ConvNonlinNorm(nn.Module):
    """Convolution, nonlinearity, normalisation (the order of sections 2.1-2.2), optionally dilated (atrous) and
    optionally with a residual connection around the convolution, added before the normalisation (a 1x1
    projection when the channel count changes)."""

    def __init__(self, conv_op: type[nn.Module], in_channels: int, out_channels: int, kernel_size: Sequence[int],
                 dilation: int, conv_bias: bool, norm_op: type[nn.Module] | None, norm_op_kwargs: dict | None,
                 nonlin: type[nn.Module] | None, nonlin_kwargs: dict | None, residual: bool = False):
        super().__init__()
        # dilate only the axes the plan convolves along (anisotropic plans use kernel 1 on some axes)
        dilations = [dilation if k > 1 else 1 for k in kernel_size]
        self.conv = conv_op(in_channels, out_channels, list(kernel_size), 1,
                            padding=[d * (k - 1) // 2 for k, d in zip(kernel_size, dilations)], dilation=dilations,
                            bias=conv_bias)
        self.nonlin = nonlin(**(nonlin_kwargs or {})) if nonlin is not None else nn.Identity()
        self.norm = norm_op(out_channels, **(norm_op_kwargs or {})) if norm_op is not None else nn.Identity()
        self.shortcut: nn.Module | None = None
        if residual:
            self.shortcut = nn.Identity() if in_channels == out_channels else \
                conv_op(in_channels, out_channels, 1, 1, 0, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.nonlin(side_conv(self.conv, x))
        if self.shortcut is not None:
            y = y + (x if isinstance(self.shortcut, nn.Identity) else side_conv(self.shortcut, x))
        # normalised last (also after the residual sum), so the sigmoid after the branch starts unsaturated
        return self.norm(y)


class AttentionShiftingBlock(nn.Module):
    """A decoder stage of MisMatch: ``main`` (the planned stage) gated by ``side``'s sigmoid mask, plus the skip
    connection: out = main(x) * sigmoid(side(x)) + main(x)."""

    def __init__(self, main: nn.Module, side: nn.Module):
        super().__init__()
        self.main = main
        self.side = side

    def forward_with_mask(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.main(x)
        mask = torch.sigmoid(self.side(x))
        return torch.addcmul(features, features, mask), mask  # features * mask + features, one kernel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_with_mask(x)[0]


def side_branch(kind: str, encoder: nn.Module, in_channels: int, stage_channels: int, kernel_size: Sequence[int],
                side_reduction: int = 8, dilation: int = DILATION) -> nn.Sequential:
    """The side branch of a positive (``kind='positive'``: atrous) or negative (``'negative'``: residual) attention
    shifting block, with the planned convolution, normalisation and nonlinearity types: ``in_channels`` to
    ``stage_channels // side_reduction`` to one channel, the per-voxel magnitude of the feature change (the mask
    broadcasts over the main branch's channels)."""
    if kind not in ("positive", "negative"):
        raise ValueError(f"kind must be 'positive' or 'negative', got {kind!r}")
    hidden = max(1, stage_channels // side_reduction)
    common = {"conv_op": encoder.conv_op, "kernel_size": kernel_size, "conv_bias": encoder.conv_bias,
              "norm_op": encoder.norm_op, "norm_op_kwargs": encoder.norm_op_kwargs, "nonlin": encoder.nonlin,
              "nonlin_kwargs": encoder.nonlin_kwargs}
    positive = kind == "positive"
    layer = {"dilation": dilation if positive else 1, "residual": not positive, **common}
    return nn.Sequential(ConvNonlinNorm(in_channels=in_channels, out_channels=hidden, **layer),
                         ConvNonlinNorm(in_channels=hidden, out_channels=1, **layer))


def convert_to_attention_shifting(decoder: nn.Module, encoder: nn.Module, kind: str, side_reduction: int = 8,
                                  dilation: int = DILATION) -> list[nn.Module]:
    """Turn every stage of a planned ``UNetDecoder`` into an attention shifting block (in place); return the new
    side branches (to be initialised like the rest of the network)."""
    sides = []
    for s, stage in enumerate(decoder.stages):
        # the stage's planned channels and kernel (UNetDecoder's indexing: stage s merges skip -(s + 2))
        channels = encoder.output_channels[-(s + 2)]
        kernel = [int(k) for k in maybe_convert_scalar_to_list(encoder.conv_op, encoder.kernel_sizes[-(s + 2)])]
        side = side_branch(kind, encoder, 2 * channels, channels, kernel, side_reduction, dilation)
        decoder.stages[s] = AttentionShiftingBlock(stage, side)
        sides.append(side)
    return sides


class DualDecoder(nn.Module):
    """The two decoders behind nnU-Net's ``network.decoder`` handle: setting ``deep_supervision`` (as nnU-Net's
    ``set_deep_supervision_enabled`` does) switches both; ``forward(skips)`` returns the mean prediction, like a
    single decoder would.

    Whether the dataset is region-based (sigmoid outputs) decides how the two outputs are averaged. The network
    builder cannot know it (nnU-Net passes it the plans, not the labels), so the trainer sets it and it is stored
    in the state dict (buffer ``region_based``); loading a checkpoint, as nnU-Net's predictor does, restores it."""

    def __init__(self, dilation: nn.Module, erosion: nn.Module):
        super().__init__()
        self.dilation = dilation
        self.erosion = erosion
        self.register_buffer("region_based", torch.zeros((), dtype=torch.bool))
        self.regions = False  # Python copy of the buffer: no device sync and no graph break in forward

    @property
    def deep_supervision(self) -> bool:
        return self.dilation.deep_supervision

    @deep_supervision.setter
    def deep_supervision(self, enabled: bool) -> None:
        self.dilation.deep_supervision = enabled
        self.erosion.deep_supervision = enabled

    def set_region_based(self, regions: bool) -> None:
        self.region_based.fill_(bool(regions))
        self.regions = bool(regions)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self.regions = bool(self.region_based)

    def both(self, skips: list[torch.Tensor]):
        return self.dilation(skips), self.erosion(skips)

    def forward(self, skips: list[torch.Tensor]):
        a, b = self.both(skips)
        if self.deep_supervision:
            return [mean_probability_logits(i, j, self.regions) for i, j in zip(a, b)]
        return mean_probability_logits(a, b, self.regions)


def _reinitialise(modules: Sequence[nn.Module], initialize) -> None:
    for m in modules:
        if initialize is not None:
            m.apply(initialize)
        else:
            for sub in m.modules():
                if hasattr(sub, "reset_parameters"):
                    sub.reset_parameters()


class MisMatchNetwork(nn.Module):
    def __init__(self, unet: nn.Module, side_reduction: int = 8, dilation: int = DILATION):
        super().__init__()
        encoder, dilation_decoder = planned_unet_parts(unet, "MisMatch")
        # an independently initialised second decoder of the same shape; the memo keeps the decoder's reference to
        # the (shared) encoder instead of copying it
        erosion_decoder = copy.deepcopy(unet.decoder, memo={id(encoder): encoder})
        initialize = getattr(unet, "initialize", None)
        _reinitialise([erosion_decoder.stages, erosion_decoder.transpconvs, erosion_decoder.seg_layers], initialize)
        sides = convert_to_attention_shifting(dilation_decoder, encoder, "positive", side_reduction, dilation)
        sides += convert_to_attention_shifting(erosion_decoder, encoder, "negative", side_reduction, dilation)
        _reinitialise(sides, initialize)
        self.encoder = encoder
        self.decoder = DualDecoder(dilation_decoder, erosion_decoder)

    def forward(self, x: torch.Tensor, both_decoders: bool = False):
        skips = self.encoder(x)
        if both_decoders:
            return self.decoder.both(skips)
        return self.decoder(skips)
