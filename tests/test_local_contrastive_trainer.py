"""LocalContrastiveTrainer: its losses per phase, pseudo-label refreshes at the scheduled iterations and their state
(in-process), regions and the ignore label through nnU-Net's command line. Refreshes across a hard kill and ``--c``:
``test_interruption.py``."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from nnunet_ssl.methods.local_contrastive.batch import segmentation_target
from nnunet_ssl.methods.local_contrastive.trainer import LocalContrastiveTrainer
from nnunet_ssl.training.hparams import HParamError

TRAINER = "LocalContrastiveTrainer"


def make_trainer(env, configuration, monkeypatch, hparams=None, dataset_json=None) -> LocalContrastiveTrainer:
    for k, v in env.vars.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("nnUNet_n_proc_DA", "0")  # single-threaded loaders inside the test process
    if hparams is None:
        monkeypatch.delenv("nnUNet_ssl_hparams", raising=False)
    else:
        monkeypatch.setenv("nnUNet_ssl_hparams", json.dumps(hparams))
    plans = {**json.loads((env.pp / "nnUNetPlans.json").read_text()), "continue_training": False}
    dataset_json = dataset_json or json.loads((env.pp / "dataset.json").read_text())
    return LocalContrastiveTrainer(plans, configuration, 0, dataset_json, torch.device("cpu"))


def test_bad_settings_fail_before_training(demo, monkeypatch):
    single = json.loads((demo.pp / "dataset.json").read_text())
    single["labels"] = {"background": 0, "organ": 1}
    with pytest.raises(HParamError, match="single foreground label.*include_background"):
        make_trainer(demo, "3d_fullres", monkeypatch, dataset_json=single)
    make_trainer(demo, "3d_fullres", monkeypatch, {"include_background": True}, dataset_json=single)
    with pytest.raises(HParamError, match="does not fit"):
        make_trainer(demo, "3d_fullres", monkeypatch, {"num_epochs": 2, "num_iterations_per_epoch": 2,
                                                        "pseudo_label_rounds": 5})
    with pytest.raises(HParamError, match="matching"):
        make_trainer(demo, "3d_fullres", monkeypatch, {"matching": "cross"})


def _batch(trainer, n, generator):
    patch = trainer.configuration_manager.patch_size
    labels = torch.randint(0, 3, (n, 1, *patch), generator=generator).to(torch.int16)
    labels[:, :, :4] = trainer.outside_value  # outside the nonzero mask
    targets = [labels]
    for scale in trainer._get_deep_supervision_scales()[1:]:
        size = [round(p * s) for p, s in zip(patch, scale)]
        targets.append(F.interpolate(labels.float(), size, mode="nearest-exact").to(torch.int16))
    return torch.randn(n, 1, *patch, generator=generator), targets


def test_losses_per_phase_and_pseudo_labels_only_in_the_contrastive_term(demo, monkeypatch):
    trainer = make_trainer(demo, "3d_fullres", monkeypatch)
    trainer.initialize()
    trainer.network.train()
    g = torch.Generator().manual_seed(0)
    data, targets = _batch(trainer, 2, g)
    data_u, (pseudo_a,) = _batch(trainer, 2, g)[0], _batch(trainer, 2, g)[1][:1]
    pseudo_b = torch.roll(pseudo_a, 5, dims=-1)
    seg_targets = [segmentation_target(t, trainer.outside_value, False) for t in targets]
    assert all(t.max() <= 2 for t in seg_targets)

    # supervised phase: nnU-Net's forward and Dice + CE on the labeled patches; h_phi gets a zero gradient
    out = trainer.compute_losses(data, targets, torch.empty(0))
    with torch.no_grad():
        expected = trainer.loss(trainer.network(data), seg_targets)
    assert out["loss_supervised"].item() == pytest.approx(expected.item(), rel=1e-6)
    assert out["loss_contrastive"].item() == 0 and out["contrastive_weight"].item() == 0
    out["loss"].backward()
    # nnU-Net weights its lowest-resolution output 0 outside DDP (1e-6 under DDP), so only that head lacks a gradient
    unused = {n for n, p in trainer.network.named_parameters() if p.grad is None}
    assert unused == {"decoder.seg_layers.0.weight", "decoder.seg_layers.0.bias"}
    assert all(p.grad.abs().sum() == 0 for p in trainer.network.projection_head.parameters())

    # after the first pseudo-labels: changing the pseudo-labels changes the contrastive term only
    trainer.pseudo_label_round = 1
    results = []
    for pseudo in (pseudo_a, pseudo_b):
        trainer.network.zero_grad()
        trainer._target_unlabeled = pseudo
        torch.manual_seed(3)  # the same brightness/contrast changes and pixel samples
        results.append(trainer.compute_losses(data, targets, data_u))
    a, b = results
    assert a["loss_supervised"].item() == pytest.approx(b["loss_supervised"].item(), rel=1e-6)
    assert a["loss_contrastive"].item() != pytest.approx(b["loss_contrastive"].item())
    assert a["contrastive_weight"].item() == pytest.approx(0.1)
    assert a["loss"].item() == pytest.approx(a["loss_supervised"].item() + 0.1 * a["loss_contrastive"].item())
    b["loss"].backward()
    for name, p in trainer.network.named_parameters():
        if name not in unused and not name.startswith("decoder.encoder."):  # decoder.encoder is encoder
            assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.slow
def test_refresh_with_filter_and_state_in_process_2d(demo, monkeypatch):
    hp = {"num_epochs": 2, "num_iterations_per_epoch": 2, "num_val_iterations_per_epoch": 1,
          "supervised_fraction": 0.5, "pseudo_label_rounds": 1, "filter_dice_threshold": 0.5}
    trainer = make_trainer(demo, "2d", monkeypatch, hp)
    trainer.run_training()  # nnU-Net's loop: 2 epochs, the pseudo-labels at iteration 2
    assert trainer.pseudo_label_round == 1
    store = trainer.pseudo_label_store()
    selection = json.loads((store.folder / "selection.json").read_text())
    cases = sorted(trainer.unlabeled_identifiers)
    assert selection["iteration"] == 2 and store.cases() == cases
    # Table VII: the agreement of the plain and the mirrored prediction decides which cases are used
    assert sorted(selection["agreement_dice"]) == cases
    assert selection["cases"] == [c for c in cases if selection["agreement_dice"][c] > 0.5] == trainer.pseudo_label_cases
    log = trainer.logger.get_checkpoint()
    assert log["loss_contrastive"][0] == 0 and log["contrastive_weight"] == [0.0, pytest.approx(0.1)]
    assert np.isfinite(log["loss_contrastive"][1]) and log["loss_contrastive"][1] > 0

    # the round and its cases come back from the checkpoint; a missing pseudo-label is predicted again
    resumed = make_trainer(demo, "2d", monkeypatch, hp)
    resumed.load_checkpoint(str(trainer.output_folder) + "/checkpoint_final.pth")
    assert resumed.pseudo_label_round == 1 and resumed.pseudo_label_cases == trainer.pseudo_label_cases
    if resumed.pseudo_label_cases:
        resumed.unlabeled_identifiers = cases
        store.properties_file(resumed.pseudo_label_cases[0]).unlink()
        loader = resumed.get_unlabeled_dataloader()
        assert store.has(resumed.pseudo_label_cases[0])
        batch = next(loader)
        assert sorted(set(batch["keys"])) <= resumed.pseudo_label_cases and batch["target"].shape[1] == 1


@pytest.mark.slow
def test_regions_and_ignore_label(demo_regions_ignore):
    env = demo_regions_ignore
    hp = {"num_epochs": 2, "num_iterations_per_epoch": 2, "num_val_iterations_per_epoch": 1,
          "supervised_fraction": 0.5, "pseudo_label_rounds": 1, "matching": "intra", "include_background": True}
    env.run("nnUNetv2_train", str(env.dataset_id), "3d_fullres", "0", "-tr", TRAINER, "-device", "cpu", hparams=hp)
    out = env.results(TRAINER)
    ckpt = torch.load(out / "checkpoint_final.pth", weights_only=False)
    assert ckpt["nnunet_ssl"]["pseudo_label_round"] == 1
    assert np.isfinite(ckpt["logging"]["loss_contrastive"]).all() and ckpt["logging"]["loss_contrastive"][1] > 0
    assert np.isfinite(ckpt["logging"]["train_losses"]).all()
    summary = json.loads((out / "validation" / "summary.json").read_text())
    assert set(summary["mean"]) == {"(1, 2)", "2"}
