"""MuST's network: nnU-Net's U-Net at inference, teacher and student passes in training."""

import pytest
import torch
from dynamic_network_architectures.architectures.unet import PlainConvUNet, ResidualEncoderUNet
from torch import nn

from nnunet_ssl.methods.must.network import MuSTNetwork


def make_unet(kind: str, dim: int, num_classes: int = 3):
    conv, norm = (nn.Conv3d, nn.InstanceNorm3d) if dim == 3 else (nn.Conv2d, nn.InstanceNorm2d)
    common = {"input_channels": 2, "n_stages": 4, "features_per_stage": [4, 8, 16, 16], "conv_op": conv, "kernel_sizes": 3,
                  "strides": [1, 2, 2, 2], "num_classes": num_classes, "n_conv_per_stage_decoder": 1, "conv_bias": True,
                  "norm_op": norm, "norm_op_kwargs": {"eps": 1e-5, "affine": True}, "nonlin": nn.LeakyReLU,
                  "nonlin_kwargs": {"inplace": True}, "deep_supervision": True}
    if kind == "plain":
        return PlainConvUNet(n_conv_per_stage=2, **common)
    return ResidualEncoderUNet(n_blocks_per_stage=[1, 2, 2, 2], **common)


@pytest.mark.parametrize("kind", ["plain", "resenc"])
@pytest.mark.parametrize("dim", [2, 3])
def test_inference_is_exactly_nnunet(kind, dim):
    torch.manual_seed(0)
    unet = make_unet(kind, dim)
    must = MuSTNetwork(make_unet(kind, dim))
    # the state dict is nnU-Net's: a MuST checkpoint loads strictly into the plain network and vice versa
    assert list(must.state_dict()) == list(unet.state_dict())
    must.load_state_dict(unet.state_dict(), strict=True)
    x = torch.randn(2, 2, *([16] * dim))
    for net in (unet, must):
        net.eval()
        net.decoder.deep_supervision = False
    with torch.no_grad():
        assert torch.equal(must(x), unet(x))


@pytest.mark.parametrize("kind", ["plain", "resenc"])
@pytest.mark.parametrize("dim", [2, 3])
def test_training_pass_shapes_and_gradients(kind, dim):
    torch.manual_seed(0)
    must = MuSTNetwork(make_unet(kind, dim, num_classes=3)).train()
    x = torch.randn(3, 2, *([16] * dim))
    teacher, student = must(x, num_perturbed=2)
    sizes = [16, 8, 4]  # one output per decoder stage, highest resolution first
    assert [t.shape for t in teacher] == [torch.Size((3, 3, *([s] * dim))) for s in sizes]
    assert [s.shape for s in student] == [torch.Size((2, 3, *([s] * dim))) for s in sizes]
    # the student reuses the stage weights and heads: gradient from a student-only loss reaches every decoder
    # stage, every head and the encoder (through the perturbed skips and clean features below)
    sum(s.float().pow(2).mean() for s in student).backward()
    for name, p in must.named_parameters():
        if name.startswith("decoder.encoder."):
            continue  # the same tensors as encoder.*
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_student_differs_from_teacher_and_teacher_is_clean():
    torch.manual_seed(0)
    unet = make_unet("plain", 3)
    must = MuSTNetwork(make_unet("plain", 3))
    must.load_state_dict(unet.state_dict())
    x = torch.randn(2, 2, 16, 16, 16)
    with torch.no_grad():
        teacher, student = must(x, num_perturbed=1)
        clean = unet(x)  # deep-supervision outputs of the plain network
    for t, c in zip(teacher, clean):
        assert torch.allclose(t, c, atol=1e-6)
    assert not torch.allclose(student[0], teacher[0][1:])


def test_rejects_other_layouts():
    with pytest.raises(TypeError, match="nnU-Net's U-Net layout"):
        MuSTNetwork(nn.Sequential(nn.Conv3d(1, 1, 1)))
