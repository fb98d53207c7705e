"""Numerical faults: an iteration with a non-finite loss or gradient is skipped (no parameter and no teacher
update), counted and logged; training stops with a clear message when it keeps happening. The losses' entropies,
logarithms and normalisations stay finite at probabilities 0 and 1, on all-zero features and with empty classes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import make_trainer

from nnunet_ssl.methods.local_contrastive.losses import local_contrastive_loss, sample_anchors
from nnunet_ssl.methods.must.losses import multiscale_consistency_loss
from nnunet_ssl.methods.popcorn.losses import bottleneck_consistency_loss
from nnunet_ssl.methods.ugmcl.losses import cross_task_consistency, masked_mean_squared_error
from nnunet_ssl.trainers import TRAINERS
from nnunet_ssl.training.distance import normalized_signed_distances
from nnunet_ssl.training.supervised import NonFiniteLossError
from nnunet_ssl.training.uncertainty import predictive_entropy


def _state(trainer) -> dict[str, torch.Tensor]:
    state = {f"net.{k}": v.clone() for k, v in trainer.unwrapped_network().state_dict().items()}
    if hasattr(trainer, "teacher"):
        state.update({f"teacher.{k}": v.clone() for k, v in trainer.teacher.state_dict().items()})
    return state


def _unchanged(before: dict, trainer) -> bool:
    after = _state(trainer)
    return all(torch.equal(before[k], after[k]) for k in before)


def _poisoned(batch: dict) -> dict:
    data = batch["data"].clone()
    data[0, 0, 0, 0] = float("nan")  # one voxel of one image: instance norm spreads it over the whole loss
    return {**batch, "data": data}


@pytest.mark.parametrize("name", list(TRAINERS))
def test_nonfinite_loss_skips_the_step_and_stops_when_it_persists(name, demo, monkeypatch, tmp_path):
    trainer = make_trainer(demo, name, monkeypatch, tmp_path, {"max_nonfinite_steps": 2})
    trainer.on_train_start()
    try:
        trainer.on_train_epoch_start()
        outputs = [trainer.train_step(next(trainer.dataloader_train))]
        assert not outputs[0]["skipped"]
        before = _state(trainer)
        outputs.append(trainer.train_step(_poisoned(next(trainer.dataloader_train))))
        assert outputs[-1]["skipped"] and not np.isfinite(outputs[-1]["loss"])
        assert _unchanged(before, trainer), "a skipped step changed the weights or the teacher"
        assert trainer.nonfinite_steps == 1 and trainer.global_step == 2
        outputs.append(trainer.train_step(next(trainer.dataloader_train)))  # a good step resets the run
        assert not outputs[-1]["skipped"] and not _unchanged(before, trainer)
        outputs.append(trainer.train_step(_poisoned(next(trainer.dataloader_train))))
        trainer.on_train_epoch_end(outputs)  # the epoch's means leave the skipped iterations out
        logged = trainer.logger.get_value("train_losses", step=-1)
        assert logged == pytest.approx(np.mean([outputs[0]["loss"], outputs[2]["loss"]]))
        assert trainer.extra_checkpoint_state()["nonfinite_steps"] == 2
        with pytest.raises(NonFiniteLossError, match=r"2 iterations in a row had a non-finite loss or gradient"):
            trainer.train_step(_poisoned(next(trainer.dataloader_train)))
    finally:
        if hasattr(trainer, "shutdown_unlabeled_dataloader"):
            trainer.shutdown_unlabeled_dataloader()
    log = max(tmp_path.rglob("training_log_*.txt"), key=lambda p: p.stat().st_mtime).read_text()
    assert "non-finite loss" in log and "the step was skipped" in log


def test_nonfinite_gradient_with_finite_loss_is_skipped(demo, monkeypatch, tmp_path):
    trainer = make_trainer(demo, "SupervisedTrainer", monkeypatch, tmp_path)
    trainer.on_train_start()
    compute = trainer.compute_losses

    def sqrt_at_zero(data, target, data_unlabeled):
        losses = compute(data, target, data_unlabeled)
        weight = next(trainer.unwrapped_network().parameters())
        return {**losses, "loss": losses["loss"] + torch.sqrt(weight.sum() * 0)}  # + 0, gradient 0 * inf = NaN
    trainer.compute_losses = sqrt_at_zero
    trainer.on_train_epoch_start()
    before = _state(trainer)
    out = trainer.train_step(next(trainer.dataloader_train))
    assert np.isfinite(out["loss"]) and out["skipped"] and _unchanged(before, trainer)


def test_losses_are_finite_at_the_edges():
    onehot = torch.zeros(2, 3, 4, 4)
    onehot[:, 0] = 1  # probabilities exactly 0 and 1, classes 1 and 2 empty
    assert torch.equal(predictive_entropy(onehot, regions=False), torch.zeros(2, 1, 4, 4))
    assert torch.equal(predictive_entropy(onehot, regions=True), torch.zeros_like(onehot))

    saturated = torch.full((2, 3, 4, 4), -1e4, requires_grad=True)  # softmax/sigmoid at 0 and 1
    with torch.no_grad():
        saturated[:, 0] = 1e4
    for regions in (False, True):
        loss = multiscale_consistency_loss([saturated.detach()], [saturated], 0.5, regions)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(saturated.grad).all()

    zeros = torch.zeros(4, 8, 2, 2, requires_grad=True)  # all-zero bottleneck features: eq. 4's 0 / 0
    loss = bottleneck_consistency_loss(zeros, torch.ones(2))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(zeros.grad).all()

    embeddings = torch.zeros(2, 16, 4, 4, requires_grad=True)  # cosine similarity of zero vectors
    membership = torch.zeros(2, 3, 4, 4, dtype=torch.bool)
    membership[:, 1] = True  # class 2 absent everywhere, class 1 everywhere
    anchors, valid = sample_anchors(membership, 3)
    for matching in ("intra", "inter"):
        loss = local_contrastive_loss(embeddings, membership, anchors, valid, 0.1, matching)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(embeddings.grad).all()

    probs = torch.rand(1, 2, 4, 4, requires_grad=True)
    uncertain = torch.zeros(1, 1, 4, 4)  # every voxel masked out
    assert masked_mean_squared_error(probs, probs.detach() + 1, uncertain) == 0
    sdf = torch.full((1, 1, 4, 4), -1.0)
    assert torch.isfinite(cross_task_consistency(probs[:, 1:], sdf, 1500.0))

    empty, full = np.zeros((6, 6), bool), np.ones((6, 6), bool)
    sdfs = normalized_signed_distances([empty, full])
    assert np.isfinite(sdfs).all() and np.abs(sdfs).max() <= 1
