"""MisMatch's network: attention shifting blocks, two decoders on the planned encoder, the averaged prediction."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from dynamic_network_architectures.architectures.unet import PlainConvUNet
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from test_must_network import make_unet
from torch import nn

from nnunet_ssl.methods.mismatch.losses import consistency_loss, supervised_loss
from nnunet_ssl.methods.mismatch.network import (
    AttentionShiftingBlock,
    ConvNonlinNorm,
    MisMatchNetwork,
    mean_sigmoid_logits,
    mean_softmax_logits,
    side_conv,
)


def make_net(kind="plain", dim=3, num_classes=3, seed=0):
    torch.manual_seed(seed)
    return MisMatchNetwork(make_unet(kind, dim, num_classes))


@pytest.mark.parametrize("dim", [2, 3])
def test_blocks_shapes_masks_and_formula(dim):
    net = make_net(dim=dim)
    x = torch.randn(2, 2, *([16] * dim))
    skips = net.encoder(x)
    for decoder, kind in ((net.decoder.dilation, "positive"), (net.decoder.erosion, "negative")):
        lres = skips[-1]
        for s, block in enumerate(decoder.stages):
            assert isinstance(block, AttentionShiftingBlock)
            skip = skips[-(s + 2)]
            inp = torch.cat((decoder.transpconvs[s](lres), skip), 1)
            out, mask = block.forward_with_mask(inp)
            assert out.shape == skip.shape  # the planned stage's output shape
            assert mask.shape == (skip.shape[0], 1, *skip.shape[2:])  # one magnitude per voxel
            assert (mask > 0).all() and (mask < 1).all()
            main = block.main(inp)
            assert torch.allclose(out, main * mask + main, atol=1e-6)  # gated main branch plus skip connection
            convs = [m for m in block.side if isinstance(m, ConvNonlinNorm)]
            assert len(convs) == 2
            for c in convs:
                if kind == "positive":  # atrous, no residual
                    assert c.conv.dilation == (5,) * dim and c.shortcut is None
                else:  # plain kernel with a residual connection on each convolution
                    assert c.conv.dilation == (1,) * dim and c.shortcut is not None
            # the paper's order after each convolution: nonlinearity, then normalisation
            assert isinstance(convs[0].nonlin, nn.LeakyReLU) and isinstance(convs[0].norm, nn.modules.instancenorm._InstanceNorm)
            lres = out


def test_anisotropic_kernels_dilate_only_convolved_axes():
    torch.manual_seed(0)
    unet = PlainConvUNet(1, 3, [4, 8, 16], nn.Conv3d, [[1, 3, 3], [3, 3, 3], [3, 3, 3]], [1, [1, 2, 2], 2], 2, 2,
                         1, True, nn.InstanceNorm3d, {"eps": 1e-5, "affine": True}, None, None, nn.LeakyReLU,
                         {"inplace": True}, deep_supervision=True)
    net = MisMatchNetwork(unet)
    top = net.decoder.dilation.stages[-1].side[0].conv
    assert top.kernel_size == (1, 3, 3) and top.dilation == (1, 5, 5) and top.padding == (0, 5, 5)
    out_d, out_e = net(torch.randn(1, 1, 8, 16, 16), both_decoders=True)
    assert out_d[0].shape == out_e[0].shape == (1, 2, 8, 16, 16)


@pytest.mark.parametrize("kind", ["plain", "resenc"])
@pytest.mark.parametrize("dim", [2, 3])
def test_two_decoders_deep_supervision_and_fused_eval_output(kind, dim):
    net = make_net(kind, dim)
    x = torch.randn(2, 2, *([16] * dim))
    out_d, out_e = net(x, both_decoders=True)
    sizes = [16, 8, 4]  # nnU-Net's deep-supervision outputs, highest resolution first
    for outs in (out_d, out_e):
        assert [o.shape for o in outs] == [torch.Size((2, 3, *([s] * dim))) for s in sizes]
    # nnU-Net's own switch (set_deep_supervision_enabled) reaches both decoders
    nnUNetTrainer.set_deep_supervision_enabled(SimpleNamespace(is_ddp=False, network=net), False)
    assert net.decoder.dilation.deep_supervision is False and net.decoder.erosion.deep_supervision is False
    net.eval()
    with torch.no_grad():
        fused = net(x)
        single_d, single_e = net(x, both_decoders=True)
    assert isinstance(fused, torch.Tensor) and fused.shape == (2, 3, *([16] * dim))
    assert torch.allclose(single_d, out_d[0], atol=1e-5)
    p = (torch.softmax(single_d.double(), 1) + torch.softmax(single_e.double(), 1)) / 2
    assert torch.allclose(torch.softmax(fused.double(), 1), p, atol=1e-6)
    nnUNetTrainer.set_deep_supervision_enabled(SimpleNamespace(is_ddp=False, network=net), True)
    with torch.no_grad():
        fused_ds = net(x)
    assert [f.shape[2:] for f in fused_ds] == [torch.Size([s] * dim) for s in sizes]


def test_region_based_average_is_sigmoid_mean_and_survives_a_strict_load():
    net = make_net(num_classes=2)
    net.decoder.set_region_based(True)
    net.eval()
    net.decoder.deep_supervision = False
    x = torch.randn(1, 2, 16, 16, 16)
    with torch.no_grad():
        fused = net(x)
        a, b = net(x, both_decoders=True)
    expected = (1 / (1 + np.exp(-a.double().numpy())) + 1 / (1 + np.exp(-b.double().numpy()))) / 2
    np.testing.assert_allclose(torch.sigmoid(fused.double()).numpy(), expected, atol=1e-6)
    # nnU-Net's predictor builds the network without knowing the labels, then loads the weights strictly
    rebuilt = make_net(num_classes=2, seed=1)
    assert rebuilt.decoder.regions is False
    rebuilt.load_state_dict(net.state_dict(), strict=True)
    assert rebuilt.decoder.regions is True
    rebuilt.eval()
    rebuilt.decoder.deep_supervision = False
    with torch.no_grad():
        assert torch.equal(rebuilt(x), fused)


def _sigmoid(x):
    return 1 / (1 + np.exp(-x))


def test_mean_logits_are_exact_and_finite_at_saturation():
    a = torch.tensor([[[0.0], [2.0], [-1.0]], [[1e4], [-1e4], [0.0]]]).half()  # (2, 3, 1), fp16 as under autocast
    b = torch.tensor([[[3.0], [0.0], [0.0]], [[-1e4], [1e4], [-5.0]]]).half()
    out = mean_softmax_logits(a, b)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    pa, pb = (np.exp(v) / np.exp(v).sum(1, keepdims=True) for v in (a[:1].double().numpy(), b[:1].double().numpy()))
    np.testing.assert_allclose(torch.softmax(out.double(), 1)[:1].numpy(), (pa + pb) / 2, atol=1e-6)
    # second sample: each decoder certain of a different class -> (0.5, 0.5, 0)
    np.testing.assert_allclose(torch.softmax(out, 1)[1, :, 0].numpy(), [0.5, 0.5, 0.0], atol=1e-6)
    # sigmoid: where both decoders are near-certain, 1 - m is below fp32 rounding of m; the logit stays exact
    xa = np.array([30.0, -30.0, 0.0, 200.0, 12.0])
    xb = np.array([29.0, -31.0, 4.0, -200.0, 11.0])
    out = mean_sigmoid_logits(torch.tensor(xa, dtype=torch.float32), torch.tensor(xb, dtype=torch.float32))
    expected = np.log((_sigmoid(xa) + _sigmoid(xb)) / 2) - np.log((_sigmoid(-xa) + _sigmoid(-xb)) / 2)
    assert out.dtype == torch.float32
    np.testing.assert_allclose(out.double().numpy(), expected, rtol=1e-5, atol=1e-5)


def test_decoders_are_independent_and_encoder_is_shared():
    net = make_net()
    assert net.decoder.erosion.encoder is net.encoder and net.decoder.dilation.encoder is net.encoder
    assert not torch.equal(net.decoder.dilation.transpconvs[0].weight, net.decoder.erosion.transpconvs[0].weight)
    # no duplicated parameters: encoder + 2 x (transposed convs, stages with side branches, heads)
    decoder_params = sum(p.numel() for d in (net.decoder.dilation, net.decoder.erosion)
                         for m in (d.transpconvs, d.stages, d.seg_layers) for p in m.parameters())
    assert sum(p.numel() for p in net.parameters()) == sum(p.numel() for p in net.encoder.parameters()) + \
        decoder_params


def test_every_parameter_gets_a_gradient_from_the_training_losses():
    # DDP requires it: both decoders, all side branches and the encoder
    net = make_net().train()
    x = torch.randn(3, 2, 16, 16, 16)
    out_d, out_e = net(x, both_decoders=True)
    target = torch.randint(0, 3, (2, 16, 16, 16))

    def ce(outs, t):  # deep supervision: every head is supervised
        return sum(nn.functional.cross_entropy(o, t[:, ::2 ** i, ::2 ** i, ::2 ** i]) for i, o in enumerate(outs))

    loss = supervised_loss(ce, [o[:2] for o in out_d], [o[:2] for o in out_e], target) + \
        consistency_loss(out_d[0][2:], out_e[0][2:])
    loss.backward()
    for name, p in net.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_rejects_other_layouts():
    with pytest.raises(TypeError, match="nnU-Net's U-Net layout"):
        MisMatchNetwork(nn.Sequential(nn.Conv3d(1, 1, 1)))


def test_compiles_without_graph_breaks():
    # torch.compile (nnU-Net's default on CUDA) traces the training pass and the prediction as single graphs
    net = make_net(dim=2)
    x = torch.randn(2, 2, 16, 16)

    def training_pass(x):
        out_d, out_e = net(x, both_decoders=True)
        return consistency_loss(out_d[0], out_e[0])

    explained = torch._dynamo.explain(training_pass)(x)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0)
    net.eval()
    net.decoder.set_region_based(True)
    explained = torch._dynamo.explain(net)(x)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0)


@pytest.mark.parametrize("dim,dilation", [(2, 5), (3, 5), (3, 1)])
def test_side_convolutions_of_one_image_use_onednn_with_the_same_result_and_gradients(dim, dilation):
    """A one-image, 4-channel input is below PyTorch's size threshold for oneDNN; ``side_conv`` uses it anyway."""
    from torch.profiler import profile

    torch.manual_seed(0)
    conv = (nn.Conv2d if dim == 2 else nn.Conv3d)(4, 4, 3, padding=dilation, dilation=dilation)
    x = torch.randn(1, 4, *([20] * dim), requires_grad=True)
    with profile() as prof:
        fast = side_conv(conv, x)
    kernels = {e.name for e in prof.events()}
    assert "aten::mkldnn_convolution" in kernels and not any("slow_conv" in k for k in kernels)
    grads_fast = torch.autograd.grad(fast.square().sum(), (x, conv.weight, conv.bias))
    with profile() as prof:
        plain = conv(x)
    assert any("slow_conv" in e.name for e in prof.events())  # what the side branches ran on before
    grads_plain = torch.autograd.grad(plain.square().sum(), (x, conv.weight, conv.bias))
    assert torch.allclose(fast, plain, atol=1e-5)
    for a, b in zip(grads_fast, grads_plain):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-4)


def test_one_image_prediction_compiles_without_graph_breaks_and_matches_the_batch():
    net = make_net(dim=3).eval()
    net.decoder.deep_supervision = False  # as nnU-Net's predictor runs it
    x = torch.randn(2, 2, 16, 16, 16)
    with torch.no_grad():
        batch = net(x)
        single = torch.cat([net(x[i:i + 1]) for i in range(2)])  # the CPU fast path of the side branches
    assert torch.allclose(single, batch, atol=1e-4)
    explained = torch._dynamo.explain(net)(x[:1])
    assert (explained.graph_count, explained.graph_break_count) == (1, 0)
