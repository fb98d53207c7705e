"""With ``seed`` set and single-threaded data loading on the CPU, two runs of a trainer give identical losses (for
LocalContrastiveTrainer across a pseudo-label refresh, see ``conftest.QUICK``)."""

from __future__ import annotations

import pytest
from conftest import first_losses, make_trainer

from nnunet_ssl.trainers import TRAINERS

ITERATIONS = 3


def _run(name, demo, monkeypatch, results, seed: int) -> list[dict]:
    trainer = make_trainer(demo, name, monkeypatch, results, {"seed": seed})
    return [{k: float(v) for k, v in out.items()} for out in first_losses(trainer, ITERATIONS)]


@pytest.mark.parametrize("name", list(TRAINERS))
def test_same_seed_same_losses(name, demo, monkeypatch, tmp_path):
    first = _run(name, demo, monkeypatch, tmp_path / "a", seed=3)
    second = _run(name, demo, monkeypatch, tmp_path / "b", seed=3)
    assert first == second
    assert len({out["loss"] for out in first}) > 1  # the iterations saw different batches


def test_another_seed_other_losses(demo, monkeypatch, tmp_path):
    assert _run("MuSTTrainer", demo, monkeypatch, tmp_path / "a", seed=3) != \
        _run("MuSTTrainer", demo, monkeypatch, tmp_path / "b", seed=4)


def test_must_scale_reduction_divides_by_scales(demo, monkeypatch, tmp_path):
    """Same seed, so the same batch and perturbations: the default ``scale_reduction`` "mean" is eq. 3's sum over
    the decoder scales divided by their number."""
    losses = {}
    for reduction in ("sum", "mean"):
        trainer = make_trainer(demo, "MuSTTrainer", monkeypatch, tmp_path / reduction,
                               {"seed": 3, "scale_reduction": reduction})
        losses[reduction] = float(first_losses(trainer, 1)[0]["loss_consistency"])
        scales = len(trainer.network.decoder.stages)
    assert scales > 1 and losses["sum"] > 0
    assert losses["mean"] == pytest.approx(losses["sum"] / scales, rel=1e-5)
