"""``target_alignment`` (not in the papers; MuSTTrainer and MisMatchTrainer) in a training of a few iterations on the
demo dataset."""

import numpy as np
import pytest
import torch
from conftest import first_losses, make_trainer

from nnunet_ssl.training.hparams import HParamError


@pytest.mark.parametrize("name", ["MuSTTrainer", "MisMatchTrainer"])
def test_target_alignment_trains_resumes_and_changes_only_the_consistency(name, demo, monkeypatch, tmp_path):
    aligned = make_trainer(demo, name, monkeypatch, tmp_path / "aligned",
                           {"seed": 3, "target_alignment": True, "rampup_fraction": 0.0})
    on = first_losses(aligned, 2)
    plain = make_trainer(demo, name, monkeypatch, tmp_path / "plain", {"seed": 3, "rampup_fraction": 0.0})
    off = first_losses(plain, 2)
    # the same batches and perturbations: the first supervised loss is the same, the consistency targets are not
    assert float(on[0]["loss_supervised"]) == pytest.approx(float(off[0]["loss_supervised"]), rel=1e-6)
    assert float(on[0]["loss_consistency"]) != pytest.approx(float(off[0]["loss_consistency"]), rel=1e-4)
    assert plain._shares is None

    # the target shares are the labeled training cases' split of their foreground, counted here by hand
    labeled = [np.asarray(aligned.labeled_images().load_case(c)[1][:]) for c in aligned.do_split()[0]]
    counts = np.array([sum(int((seg == v).sum()) for seg in labeled) for v in (1, 2)], dtype=float)
    shares = aligned.foreground_shares()
    assert aligned.foreground_labels() == [1, 2]
    assert np.allclose(shares.goal.numpy(), counts / counts.sum())
    assert len(shares.masses) == 2  # one entry per iteration
    assert torch.allclose(shares.ratio(), (shares.goal / shares.shares()).float())

    # the running shares travel with the checkpoint, so --c resumes the same alignment
    checkpoint = tmp_path / "checkpoint.pth"
    aligned.save_checkpoint(str(checkpoint))
    resumed = make_trainer(demo, name, monkeypatch, tmp_path / "resumed",
                           {"seed": 3, "target_alignment": True, "rampup_fraction": 0.0})
    resumed.load_checkpoint(str(checkpoint))
    assert len(resumed.foreground_shares().masses) == 2
    assert torch.equal(resumed.foreground_shares().shares(), shares.shares())


@pytest.mark.parametrize("name", ["MuSTTrainer", "MisMatchTrainer"])
def test_target_alignment_refused_for_regions(name, demo_regions_ignore, monkeypatch, tmp_path):
    with pytest.raises(HParamError, match="target_alignment = true needs mutually exclusive labels"):
        make_trainer(demo_regions_ignore, name, monkeypatch, tmp_path, {"target_alignment": True},
                     configuration="3d_fullres")
