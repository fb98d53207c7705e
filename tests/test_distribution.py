"""ReMixMatch's distribution alignment on the foreground (``training/distribution.py``) against values by hand."""

import pytest
import torch

from nnunet_ssl.training.distribution import ForegroundShares, align_foreground


def test_align_foreground_by_hand():
    # one voxel (0.2, 0.6, 0.2), ratio (1, 3): foreground (0.6, 0.6) rescaled to its mass 0.8 -> (0.4, 0.4)
    p = torch.tensor([0.2, 0.6, 0.2]).view(1, 3, 1)
    out = align_foreground(p, torch.tensor([1.0, 3.0]))
    assert torch.allclose(out.flatten(), torch.tensor([0.2, 0.4, 0.4]))
    # every voxel keeps its background and still sums to 1; a ratio of ones changes nothing
    probs = torch.softmax(torch.randn(2, 4, 5, 6), 1)
    aligned = align_foreground(probs, torch.tensor([0.5, 2.0, 4.0]))
    assert torch.equal(aligned[:, 0], probs[:, 0])
    assert torch.allclose(aligned.sum(1), torch.ones(2, 5, 6))
    assert torch.allclose(align_foreground(probs, torch.ones(3)), probs)
    # the channel with the larger ratio gains where both foreground channels have mass
    assert (aligned[:, 3] / aligned[:, 1] > probs[:, 3] / probs[:, 1]).all()
    with pytest.raises(ValueError, match=r"expected \(3,\)"):
        align_foreground(probs, torch.ones(4))


def test_align_foreground_without_foreground_mass():
    p = torch.tensor([1.0, 0.0, 0.0]).view(1, 3, 1)
    assert torch.equal(align_foreground(p, torch.tensor([2.0, 0.5])), p)


def test_foreground_shares_running_window_by_hand():
    shares = ForegroundShares([0.1, 0.3], window=2)  # labeled: a quarter / three quarters of the foreground
    assert torch.allclose(shares.goal, torch.tensor([0.25, 0.75], dtype=torch.float64))
    assert torch.allclose(shares.shares(), torch.tensor([0.5, 0.5], dtype=torch.float64))  # nothing seen yet
    # batch 1: two voxels (0.5, 0.4, 0.1) and (0.1, 0.3, 0.1): foreground masses (0.7, 0.2)
    b1 = torch.tensor([[0.5, 0.1], [0.4, 0.3], [0.1, 0.1]])[None]
    shares.update(b1)
    assert torch.allclose(shares.shares(), torch.tensor([0.7, 0.2], dtype=torch.float64) / 0.9)
    assert torch.allclose(shares.ratio(), torch.tensor([0.25 * 0.9 / 0.7, 0.75 * 0.9 / 0.2]))
    # batch 2: masses (0.1, 0.5); batch 3 evicts batch 1 from the window of 2: masses (0.1, 0.5) + (0.3, 0.3)
    shares.update(torch.tensor([[0.4], [0.1], [0.5]])[None])
    assert torch.allclose(shares.shares(), torch.tensor([0.8, 0.7], dtype=torch.float64) / 1.5)
    shares.update(torch.tensor([[0.4], [0.3], [0.3]])[None])
    assert torch.allclose(shares.shares(), torch.tensor([0.4, 0.8], dtype=torch.float64) / 1.2)
    # the state round-trips, window included
    restored = ForegroundShares([0.1, 0.3], window=5)
    restored.load_state_dict(shares.state_dict())
    assert restored.masses.maxlen == 2 and torch.equal(restored.shares(), shares.shares())
    with pytest.raises(ValueError, match="3 channels for 1 foreground shares"):
        ForegroundShares([1.0]).update(b1)
    with pytest.raises(ValueError, match="non-negative with a positive sum"):
        ForegroundShares([0.0, 0.0])
