"""LocalContrastiveNetwork: nnU-Net's U-Net at inference, segmentation outputs and embeddings in one training pass."""

import pytest
import torch
from test_must_network import make_unet
from torch import nn

from nnunet_ssl.methods.local_contrastive.losses import local_contrastive_loss, sample_anchors
from nnunet_ssl.methods.local_contrastive.network import EMBEDDING_DIM, LocalContrastiveNetwork


@pytest.mark.parametrize("kind", ["plain", "resenc"])
@pytest.mark.parametrize("dim", [2, 3])
def test_inference_is_exactly_nnunet(kind, dim):
    torch.manual_seed(0)
    unet = make_unet(kind, dim)
    net = LocalContrastiveNetwork(make_unet(kind, dim))
    # nnU-Net's state dict plus the projection head's parameters (saved, never run at inference)
    extra = [k for k in net.state_dict() if k not in unet.state_dict()]
    assert extra and all(k.startswith("projection_head.") for k in extra)
    assert [k for k in net.state_dict() if k in unet.state_dict()] == list(unet.state_dict())
    missing, unexpected = net.load_state_dict(unet.state_dict(), strict=False)
    assert sorted(missing) == sorted(extra) and not unexpected
    x = torch.randn(2, 2, *([16] * dim))
    for n in (unet, net):
        n.eval()
        n.decoder.deep_supervision = False
    with torch.no_grad():
        assert torch.equal(net(x), unet(x))
        # the training pass gives the same segmentation outputs, deep supervision on or off
        seg, _ = net(x, return_embeddings=True)
        assert torch.equal(seg, unet(x))
        for n in (unet, net):
            n.decoder.deep_supervision = True
        seg, _ = net(x, return_embeddings=True)
        assert all(torch.equal(a, b) for a, b in zip(seg, unet(x)))


@pytest.mark.parametrize("kind", ["plain", "resenc"])
@pytest.mark.parametrize("dim", [2, 3])
def test_training_pass_shapes_and_every_parameter_gets_a_gradient(kind, dim):
    torch.manual_seed(0)
    net = LocalContrastiveNetwork(make_unet(kind, dim, num_classes=3)).train()
    x = torch.randn(3, 2, *([16] * dim))
    seg, z = net(x, return_embeddings=True)
    assert [s.shape for s in seg] == [torch.Size((3, 3, *([s] * dim))) for s in (16, 8, 4)]
    assert z.shape == (3, EMBEDDING_DIM, *([16] * dim))  # D = 16 at the input resolution (section IV.C)
    head = net.projection_head
    conv = nn.Conv3d if dim == 3 else nn.Conv2d
    assert isinstance(head.conv1, conv) and head.conv1.kernel_size == (1,) * dim and head.conv2.kernel_size == (1,) * dim
    assert isinstance(head.norm, nn.InstanceNorm3d if dim == 3 else nn.InstanceNorm2d)
    assert isinstance(head.nonlin, nn.LeakyReLU)
    # segmentation loss + contrastive loss: a gradient for every parameter (DDP without find_unused_parameters)
    labels = torch.randint(0, 3, (3, *([16] * dim)))
    member = torch.stack([labels == c for c in (1, 2)], 1)
    idx, valid = sample_anchors(member, 3)
    loss = sum(s.float().pow(2).mean() for s in seg) + local_contrastive_loss(z, member, idx, valid)
    loss.backward()
    for name, p in net.named_parameters():
        if name.startswith("decoder.encoder."):
            continue  # the same tensors as encoder.*
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_rejects_other_layouts():
    with pytest.raises(TypeError, match="nnU-Net's U-Net layout"):
        LocalContrastiveNetwork(nn.Sequential(nn.Conv3d(1, 1, 1)))
