"""The dual-task U-Net: nnU-Net's network at inference, dropout and the regression head in training, MC passes."""

import pytest
import torch
from dynamic_network_architectures.architectures.unet import PlainConvUNet, ResidualEncoderUNet
from torch import nn

from nnunet_ssl.methods.ugmcl.network import DualTaskUNet


def make_unet(kind: str, dim: int, num_classes: int = 3, deep_supervision: bool = True):
    conv, norm = (nn.Conv3d, nn.InstanceNorm3d) if dim == 3 else (nn.Conv2d, nn.InstanceNorm2d)
    common = {"input_channels": 2, "n_stages": 4, "features_per_stage": [4, 8, 16, 16], "conv_op": conv,
              "kernel_sizes": 3, "strides": [1, 2, 2, 2], "num_classes": num_classes, "n_conv_per_stage_decoder": 1,
              "conv_bias": True, "norm_op": norm, "norm_op_kwargs": {"eps": 1e-5, "affine": True},
              "nonlin": nn.LeakyReLU, "nonlin_kwargs": {"inplace": True}, "deep_supervision": deep_supervision}
    if kind == "plain":
        return PlainConvUNet(n_conv_per_stage=2, **common)
    return ResidualEncoderUNet(n_blocks_per_stage=[1, 2, 2, 2], **common)


@pytest.mark.parametrize("kind", ["plain", "resenc"])
@pytest.mark.parametrize("dim", [2, 3])
def test_inference_is_nnunets_forward(kind, dim):
    torch.manual_seed(0)
    unet = make_unet(kind, dim)
    dual = DualTaskUNet(make_unet(kind, dim), regression_head=True)
    plain_keys = list(unet.state_dict())
    assert [k for k in dual.state_dict() if not k.startswith("sdf_head.")] == plain_keys
    assert list(DualTaskUNet(make_unet(kind, dim), regression_head=False).state_dict()) == plain_keys
    dual.load_state_dict({**unet.state_dict(), **{f"sdf_head.{k}": v for k, v in dual.sdf_head.state_dict().items()}},
                         strict=True)
    x = torch.randn(2, 2, *([16] * dim))
    for net in (unet, dual):
        net.eval()
        net.decoder.deep_supervision = False
    with torch.no_grad():
        assert torch.equal(dual(x), unet(x))  # no dropout, no regression head at inference


@pytest.mark.parametrize("kind", ["plain", "resenc"])
@pytest.mark.parametrize("dim", [2, 3])
def test_training_outputs_and_every_parameter_gets_a_gradient(kind, dim):
    torch.manual_seed(0)
    dual = DualTaskUNet(make_unet(kind, dim, num_classes=3)).train()
    x = torch.randn(3, 2, *([16] * dim))
    seg, sdf = dual(x, return_sdf=True)
    assert [s.shape for s in seg] == [torch.Size((3, 3, *([s] * dim))) for s in (16, 8, 4)]
    assert sdf.shape == (3, 3, *([16] * dim)) and sdf.abs().max() <= 1  # tanh, one map per output channel
    (sum(s.pow(2).mean() for s in seg) + sdf.pow(2).mean()).backward()
    for name, p in dual.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name  # DDP needs every parameter used


def test_dropout_in_training_only_and_decoder_path_matches_nnunet():
    torch.manual_seed(0)
    unet = make_unet("plain", 3)
    dual = DualTaskUNet(make_unet("plain", 3), regression_head=False)
    dual.load_state_dict(unet.state_dict())
    x = torch.randn(2, 2, 16, 16, 16)
    dual.train()
    with torch.no_grad():
        a, b = dual(x)[0], dual(x)[0]
        assert not torch.allclose(a, b)  # dropout sampled per call
        dual.dropout_p = 0.0  # the training decoder pass is nnU-Net's decoder (same modules and order)
        for ours, theirs in zip(dual(x), unet.train()(x)):
            assert torch.allclose(ours, theirs, atol=1e-6)
    with pytest.raises(RuntimeError, match="no regression head"):
        dual(x, return_sdf=True)


def test_channel_dropout_drops_whole_channels():
    dual = DualTaskUNet(make_unet("plain", 3), dropout_p=0.5)
    features = torch.ones(4, 16, 5, 5, 5)
    out = dual.dropout(features)
    per_channel = out.flatten(2)
    assert torch.all((per_channel == 0).all(2) | (per_channel == 2.0).all(2))  # kept channels scaled by 1/(1-p)
    assert 0 < (per_channel == 0).all(2).float().mean() < 1


def softmax(logits):
    return torch.softmax(logits, 1)


def test_mc_predict_equals_full_stochastic_passes():
    torch.manual_seed(0)
    dual = DualTaskUNet(make_unet("plain", 3, num_classes=2))
    x = torch.randn(2, 2, 16, 16, 16)
    masks = dual.dropout_masks(3, 2, 4, x)  # 3 passes, 2 samples, 4 channels of the last decoder stage
    assert set(masks.unique().tolist()) == {0.0, 2.0}
    dual.dropout_masks = lambda *args: masks
    pred = dual.mc_predict(x, passes=3, nonlin=softmax)
    assert pred.mean_probs.shape == pred.probs.shape == pred.sdf.shape == (2, 2, 16, 16, 16)
    assert not pred.mean_probs.requires_grad
    # the same masks through three full training-mode forward passes (the trunk recomputed every time)
    dual.train()
    outs = []
    with torch.no_grad():
        for t in range(3):
            dual.dropout = lambda f, t=t: f * masks[t].view(2, 4, 1, 1, 1)
            outs.append(dual(x, return_sdf=True))
    assert torch.allclose(pred.mean_probs, sum(softmax(o[0][0]) for o in outs) / 3, atol=1e-6)
    assert torch.allclose(pred.probs, softmax(outs[0][0][0]), atol=1e-6)
    assert torch.allclose(pred.sdf, outs[0][1], atol=1e-6)
    assert not torch.allclose(softmax(outs[0][0][0]), softmax(outs[1][0][0]))  # the passes differ


def test_mc_predict_without_regression_head_and_without_dropout():
    torch.manual_seed(0)
    net = DualTaskUNet(make_unet("plain", 2), regression_head=False, dropout_p=0.0).eval()
    x = torch.randn(1, 2, 16, 16)
    pred = net.mc_predict(x, passes=2, nonlin=torch.sigmoid)
    assert pred.sdf is None and pred.probs.shape == (1, 3, 16, 16)
    net.decoder.deep_supervision = False
    with torch.no_grad():
        assert torch.allclose(pred.mean_probs, torch.sigmoid(net(x)), atol=1e-6)


def test_rejects_other_layouts():
    with pytest.raises(TypeError, match="nnU-Net's U-Net layout"):
        DualTaskUNet(nn.Sequential(nn.Conv3d(1, 1, 1)))
