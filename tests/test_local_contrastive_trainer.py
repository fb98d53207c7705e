"""LocalContrastiveTrainer: its losses per phase, pseudo-label refreshes at the scheduled iterations (in-process and
through nnU-Net's command line with an interruption and ``--c``), prediction with nnU-Net's CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import BIN

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


def _wait_for_checkpoint(path, epoch, proc, timeout=900):
    start = time.time()
    while True:
        if path.exists():
            try:
                if torch.load(path, weights_only=False)["current_epoch"] >= epoch:
                    return
            except (EOFError, RuntimeError):
                pass
        if proc.poll() is not None:
            raise AssertionError(f"training ended (rc {proc.returncode}) early:\n{proc.stdout.read()[-3000:]}")
        if time.time() - start > timeout:
            raise AssertionError(f"{path} with epoch {epoch} did not appear within {timeout} s")
        time.sleep(0.2)


@pytest.mark.slow
def test_train_across_refreshes_interrupt_resume_predict(demo, tmp_path):
    # 3 epochs of 2 iterations: supervised iterations 0-1, pseudo-labels at iterations 2 and 4
    hp = {"num_epochs": 3, "num_iterations_per_epoch": 2, "num_val_iterations_per_epoch": 1, "save_every": 1,
          "supervised_fraction": 0.34, "pseudo_label_rounds": 2, "refresh_every": 2}
    out = demo.results(TRAINER)
    env = {**os.environ, **demo.vars, "nnUNet_ssl_hparams": json.dumps(hp)}
    proc = subprocess.Popen([str(BIN / "nnUNetv2_train"), str(demo.dataset_id), "3d_fullres", "0", "-tr", TRAINER,
                             "-device", "cpu"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    _wait_for_checkpoint(out / "checkpoint_latest.pth", 2, proc)  # after epoch 1, i.e. after the first refresh
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    interrupted = torch.load(out / "checkpoint_latest.pth", weights_only=False)
    assert interrupted["current_epoch"] == 2 and interrupted["nnunet_ssl"]["pseudo_label_round"] == 1
    first = json.loads((out / "pseudo_labels" / "round_1" / "selection.json").read_text())
    assert first["iteration"] == 2 and first["round"] == 1

    demo.run("nnUNetv2_train", str(demo.dataset_id), "3d_fullres", "0", "-tr", TRAINER, "-device", "cpu", "--c",
             hparams=hp)
    final = torch.load(out / "checkpoint_final.pth", weights_only=False)
    assert final["current_epoch"] == 3 and final["nnunet_ssl"]["pseudo_label_round"] == 2
    second = json.loads((out / "pseudo_labels" / "round_2" / "selection.json").read_text())
    assert second["iteration"] == 4 and sorted(second["cases"]) == sorted(first["cases"])
    assert json.loads((out / "pseudo_labels" / "round_1" / "selection.json").read_text()) == first  # kept
    log = final["logging"]
    assert log["contrastive_weight"] == [0.0, pytest.approx(0.1), pytest.approx(0.1)]
    assert log["loss_contrastive"][0] == 0 and all(np.isfinite(log["loss_contrastive"])) and log["loss_contrastive"][2] > 0
    resumed_log = max(out.glob("training_log_*.txt"), key=lambda p: p.stat().st_mtime).read_text()
    assert "Pseudo-labels round 2/2 at iteration 4" in resumed_log and "round 1/2" not in resumed_log
    assert (out / "validation" / "summary.json").exists()

    pred = tmp_path / "pred"
    demo.run("nnUNetv2_predict", "-i", str(demo.raw / "imagesTs"), "-o", str(pred), "-d", str(demo.dataset_id),
             "-c", "3d_fullres", "-tr", TRAINER, "-f", "0", "-device", "cpu", "--disable_tta")
    assert sorted(p.name for p in pred.glob("*.nii.gz")) == sorted(p.name for p in (demo.raw / "labelsTs").iterdir())


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
