"""The EMA teacher moves by exactly the expected amount, once per update, and swaps weights back bit for bit."""

import pytest
import torch
from dynamic_network_architectures.architectures.unet import PlainConvUNet
from torch import nn

from nnunet_ssl.training.teacher import EMATeacher, weights_swapped_in


def small_unet():
    return PlainConvUNet(1, 3, [4, 8, 8], nn.Conv3d, 3, [1, 2, 2], 1, 2, 1, True, nn.InstanceNorm3d,
                         {"eps": 1e-5, "affine": True}, None, None, nn.LeakyReLU, {"inplace": True},
                         deep_supervision=True)


def perturbed(net: nn.Module, seed: int) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=g))
    return net


@pytest.mark.parametrize("step, alpha, expected_decay", [(0, 0.99, 0.0), (1, 0.99, 0.5), (3, 0.99, 0.75),
                                                         (1000, 0.99, 0.99), (1000, 0.0, 0.0), (50, 0.9, 0.9)])
def test_update_is_the_exact_formula(step, alpha, expected_decay):
    torch.manual_seed(0)
    student = small_unet()
    teacher = EMATeacher(student, alpha)
    perturbed(teacher.module, 1)  # teacher and student differ
    assert teacher.decay(step) == pytest.approx(expected_decay)
    before = {k: v.clone().double() for k, v in teacher.module.named_parameters()}
    teacher.update(student, step)
    moved = 0
    for name, p_s in student.named_parameters():
        expected = expected_decay * before[name] + (1 - expected_decay) * p_s.detach().double()
        p_t = dict(teacher.module.named_parameters())[name]
        assert torch.allclose(p_t.double(), expected, rtol=0, atol=1e-6), name
        moved += int(not torch.equal(p_t.double(), before[name]))
    # it moved (the classic bug: an out-of-place add that leaves the teacher where it was)
    assert moved == len(before)
    # nnU-Net's decoder holds the encoder too: shared tensors are averaged once, not twice
    sd = teacher.module.state_dict()
    assert torch.equal(sd["decoder.encoder.stages.0.0.convs.0.conv.weight"], sd["encoder.stages.0.0.convs.0.conv.weight"])


def test_repeated_updates_converge_geometrically():
    torch.manual_seed(0)
    student = small_unet()
    teacher = EMATeacher(student, 0.9)
    perturbed(student, 2)
    w_t0 = next(teacher.module.parameters()).detach().clone()
    w_s = next(student.parameters()).detach().clone()
    for step in range(100, 110):  # past the warm start: a = 0.9 every time
        teacher.update(student, step)
    assert torch.allclose(next(teacher.module.parameters()), w_s + 0.9 ** 10 * (w_t0 - w_s), atol=1e-6)


def test_teacher_is_an_independent_fp32_copy_without_gradients():
    student = small_unet()
    teacher = EMATeacher(student, 0.99)
    assert all(p.dtype == torch.float32 and not p.requires_grad for p in teacher.module.parameters())
    assert not teacher.module.training
    w = next(teacher.module.parameters()).clone()
    with torch.no_grad():
        next(student.parameters()).add_(1.0)
    assert torch.equal(next(teacher.module.parameters()), w)
    teacher.copy_from(student)
    assert torch.equal(next(teacher.module.parameters()), next(student.parameters()))


def test_buffers_averaged_or_copied():
    student = nn.Sequential(nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2))
    teacher = EMATeacher(student, 0.5)
    student.train()
    student(torch.randn(4, 1, 3, 3) + 5)  # moves the running mean and counts a batch
    teacher.update(student, 10)
    bn_s, bn_t = student[1], teacher.module[1]
    assert torch.allclose(bn_t.running_mean, 0.5 * torch.zeros(2) + 0.5 * bn_s.running_mean)
    assert bn_t.num_batches_tracked.item() == bn_s.num_batches_tracked.item() == 1


def test_bad_alpha_is_rejected():
    for alpha in (1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match=r"\[0, 1\)"):
            EMATeacher(small_unet(), alpha)


def test_weights_swapped_in_restores_bit_for_bit():
    net = small_unet()
    other = perturbed(small_unet(), 3)
    own = {k: v.clone() for k, v in net.state_dict().items()}
    x = torch.randn(1, 1, 8, 8, 8)
    with torch.no_grad(), weights_swapped_in(net, other.state_dict()):
        assert torch.equal(net(x)[0], other(x)[0])
    assert all(torch.equal(v, own[k]) for k, v in net.state_dict().items())
