"""A trainer's placebo (``placebo_hparams``: the weights of its unsupervised losses at 0), the benchmark's control for
whether a gain comes from the unlabeled images: its loss and gradient do not depend on the unlabeled batch, while
with the method's own weights they do."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import make_trainer

from nnunet_ssl.trainers import TRAINERS
from nnunet_ssl.training.base import SemiSupervisedTrainer

WITH_PLACEBO = sorted(n for n, c in TRAINERS.items() if issubclass(c, SemiSupervisedTrainer) and c.placebo_hparams())


def test_every_weighted_method_has_a_placebo():
    assert WITH_PLACEBO == ["DTCTrainer", "LocalContrastiveTrainer", "MeanTeacherTrainer", "MisMatchTrainer",
                            "MuSTTrainer", "UAMTTrainer", "UGMCLTrainer"]
    assert TRAINERS["POPCORNTrainer"].placebo_hparams() is None  # its unlabeled images enter as pseudo-labels
    for name in WITH_PLACEBO:
        cls = TRAINERS[name]
        assert set(cls.placebo_hparams()) == set(cls.unsupervised_weights) <= set(cls.hparam_spec)
        assert all(v == 0 for v in cls.placebo_hparams().values())
        assert all(cls.hparam_spec[k].default > 0 for k in cls.unsupervised_weights)


def _loss_and_gradient(trainer, data, target, data_unlabeled) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    torch.manual_seed(0)  # the same perturbations, dropout masks and samples for every unlabeled batch
    np.random.seed(0)
    network = trainer.unwrapped_network()
    network.zero_grad(set_to_none=True)
    loss = trainer.compute_losses(data, target, data_unlabeled)["loss"]
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in network.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name", WITH_PLACEBO)
def test_the_placebo_reads_no_unlabeled_image(name, demo, monkeypatch, tmp_path):
    cls = TRAINERS[name]
    trainer = make_trainer(demo, name, monkeypatch, tmp_path, cls.placebo_hparams())
    trainer.on_train_start()
    trainer.shutdown_unlabeled_dataloader()  # the unlabeled batches are made here
    trainer.network.train()
    trainer.current_epoch = trainer.num_epochs  # every ramp at its end
    batch = next(trainer.dataloader_train)  # nnU-Net's labeled batch (with the method's targets, e.g. distances)
    data, target = batch["data"], batch["target"]
    g = torch.Generator().manual_seed(1)
    unlabeled = [torch.randn(data.shape, generator=g), 3 * torch.randn(data.shape, generator=g) + 1]
    if name == "LocalContrastiveTrainer":  # after the first pseudo-labels, when its unlabeled patches enter
        trainer.pseudo_label_round = 1
        trainer._target_unlabeled = torch.flip(target[0], dims=(-1,))

    placebo = [_loss_and_gradient(trainer, data, target, u) for u in unlabeled]
    (loss_a, grad_a), (loss_b, grad_b) = placebo
    assert torch.isfinite(loss_a) and loss_a == loss_b
    assert grad_a.keys() == grad_b.keys() and all(torch.allclose(grad_a[k], grad_b[k], rtol=1e-5, atol=1e-7)
                                                  for k in grad_a)

    trainer.hparams.update({k: cls.hparam_spec[k].default for k in cls.unsupervised_weights})  # the method itself
    (loss_a, grad_a), (loss_b, grad_b) = [_loss_and_gradient(trainer, data, target, u) for u in unlabeled]
    assert loss_a != loss_b and not all(torch.allclose(grad_a[k], grad_b[k], rtol=1e-5, atol=1e-7) for k in grad_a)
