"""What every method's network needs from nnU-Net's planned U-Net."""

from __future__ import annotations

from torch import nn

DECODER_PARTS = ("stages", "transpconvs", "seg_layers", "deep_supervision")


def planned_unet_parts(unet: nn.Module, method: str) -> tuple[nn.Module, nn.Module]:
    """The ``encoder`` and ``decoder`` of nnU-Net's planned U-Net (PlainConvUNet, ResidualEncoderUNet), checked:
    methods rebuild or extend the decoder stage by stage and keep the two names so their state dicts stay
    nnU-Net's."""
    modules = set(dict(unet.named_children()))
    if modules != {"encoder", "decoder"} or not all(hasattr(unet.decoder, a) for a in DECODER_PARTS):
        raise TypeError(f"{method} needs nnU-Net's U-Net layout (an encoder and a UNetDecoder with "
                        f"{', '.join(DECODER_PARTS)}); {type(unet).__name__} has {sorted(modules)}.")
    return unet.encoder, unet.decoder
