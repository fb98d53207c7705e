"""The four trainers in-process on the tiny demo plans: hyper-parameter checks, losses of one iteration, and a
checkpoint round trip that restores the teacher (and the student) bit for bit."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from benchmark_iteration import synthetic_batch
from nnunetv2.training.nnUNetTrainer.variants.data_augmentation.nnUNetTrainerDA5 import nnUNetTrainerDA5

from nnunet_ssl.data.labeled_fraction import make_labeled_fraction
from nnunet_ssl.data.unlabeled import labeled_case_ids
from nnunet_ssl.methods.ugmcl.losses import (
    inverse_sdf_transform,
    mean_teacher_consistency,
    pseudo_label_consistency,
)
from nnunet_ssl.methods.ugmcl.trainer import (
    DTC_HPARAMS,
    MEAN_TEACHER_HPARAMS,
    UAMT_HPARAMS,
    UGMCL_HPARAMS,
    DTCTrainer,
    MeanTeacherTrainer,
    UAMTTrainer,
    UGMCLTrainer,
    _leaves,
    cross_view_pairs,
    da5_intensity_transforms,
    dropout_advice,
    mc_passes_advice,
)
from nnunet_ssl.training.hparams import HParamError, resolve_hparams
from nnunet_ssl.training.uncertainty import probabilities


@pytest.mark.parametrize("name, value, message", [
    ("ema_alpha", 1.0, r"'ema_alpha' = 1.0 is invalid: expected a number in \[0.0, 1.0\)"),
    ("ema_alpha", -0.5, r"'ema_alpha' = -0.5 is invalid"),
    ("mc_passes", 0, r"'mc_passes' = 0 is invalid: expected an integer >= 1"),
    ("beta", 1.5, r"'beta' = 1.5 is invalid: expected a number in \[0.0, 1.0\]"),
    ("dropout_p", 1.0, r"'dropout_p' = 1.0 is invalid: expected a number in \[0.0, 1.0\)"),
    ("sdf_k", 0.0, r"'sdf_k' = 0.0 is invalid"),
    ("consistency_on", "labeled", r"'consistency_on' = 'labeled' is invalid: expected one of 'unlabeled', 'all'"),
])
def test_bad_hyper_parameters_are_rejected(name, value, message):
    with pytest.raises(HParamError, match=message):
        resolve_hparams(UGMCL_HPARAMS, "UGMCLTrainer", {name: value})


def test_defaults_are_the_papers():
    h = resolve_hparams(UGMCL_HPARAMS, "UGMCLTrainer", {})
    assert (h["beta"], h["mc_passes"], h["sdf_k"], h["ema_alpha"]) == (0.75, 8, 1500.0, 0.99)
    assert (h["consistency_weight"], h["cross_task_weight"], h["rampup"], h["rampup_fraction"]) == \
        (0.1, 0.1, "sigmoid", 1.0)
    assert (h["consistency_on"], h["cross_task_on"]) == ("all", "all")
    assert resolve_hparams(MEAN_TEACHER_HPARAMS, "MeanTeacherTrainer", {})["consistency_on"] == "unlabeled"
    assert "mc_passes" not in MEAN_TEACHER_HPARAMS and "mc_passes" in UAMT_HPARAMS
    assert "ema_alpha" not in DTC_HPARAMS and "consistency_weight" not in DTC_HPARAMS


@pytest.mark.parametrize("advice, args, expected", [
    # dropout with a single labeled case
    (dropout_advice, (1, 0.5), ("dropout_p = 0.5", "dropout_p to 0")), (dropout_advice, (1, 0.1), ("dropout_p = 0.1",)),
    (dropout_advice, (1, 0.0), None), (dropout_advice, (2, 0.5), None), (dropout_advice, (3, 0.5), None),
    # Monte-Carlo passes that cannot differ
    (mc_passes_advice, (0.0, 8), ("8 Monte-Carlo passes are one prediction repeated",)),
    (mc_passes_advice, (0.0, 2), ("2 Monte-Carlo passes are one prediction repeated",)),
    (mc_passes_advice, (0.0, 1), None), (mc_passes_advice, (0.5, 8), None), (mc_passes_advice, (0.1, 1), None)])
def test_log_advice_only_where_it_applies(advice, args, expected):
    text = advice(*args)
    assert (text is None) == (expected is None)
    assert all(e in text for e in expected or ())


def test_training_log_warns_of_dropout_with_one_labeled_case(demo, monkeypatch, tmp_path):
    env = demo.copy(tmp_path / "env")
    cases = labeled_case_ids(env.raw, json.loads((env.raw / "dataset.json").read_text()))
    make_labeled_fraction(env.pp, cases, num_labeled=1, seed=0, folds=[0])  # as `nnunet_ssl labeled-fraction`
    monkeypatch.setenv("nnUNet_n_proc_DA", "0")
    trainer = _trainer(MeanTeacherTrainer, env, monkeypatch, tmp_path)
    trainer.on_train_start()
    trainer.shutdown_unlabeled_dataloader()
    log = Path(trainer.log_file).read_text()
    assert "1 labeled training case(s)" in log and "warning: dropout_p = 0.5 with a single labeled" in log


@pytest.mark.parametrize("cls", [UAMTTrainer, UGMCLTrainer])
def test_training_log_notes_identical_passes_without_dropout(cls, demo, monkeypatch, tmp_path):
    monkeypatch.setenv("nnUNet_n_proc_DA", "0")
    trainer = _trainer(cls, demo, monkeypatch, tmp_path, {"dropout_p": 0.0})
    trainer.on_train_start()
    trainer.shutdown_unlabeled_dataloader()
    x = torch.randn(2, trainer.num_input_channels, *trainer.configuration_manager.patch_size)
    teacher = trainer.teacher_prediction(x)
    torch.testing.assert_close(teacher.mean_probs, teacher.probs)  # the passes are one prediction repeated
    assert "note: dropout_p = 0, so the teacher's 8 Monte-Carlo passes" in Path(trainer.log_file).read_text()


def _trainer(cls, demo, monkeypatch, tmp_path, hparams: dict | None = None, configuration: str = "3d_fullres"):
    for k, v in demo.vars.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("nnUNet_results", str(tmp_path / "results"))
    monkeypatch.setenv("nnUNet_ssl_hparams", json.dumps({"num_iterations_per_epoch": 2, **(hparams or {})}))
    plans = {**json.loads((demo.pp / "nnUNetPlans.json").read_text()), "continue_training": False}
    dataset_json = json.loads((demo.pp / "dataset.json").read_text())
    trainer = cls(plans, configuration, 0, dataset_json, torch.device("cpu"))
    trainer.initialize()
    return trainer


def _feed(trainer, batches):
    trainer.dataloader_unlabeled = iter([{"data": b["data"].flip(0)} for b in batches])


def _states_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("cls", [MeanTeacherTrainer, UAMTTrainer, DTCTrainer, UGMCLTrainer])
def test_one_iteration_logs_every_term(cls, demo, monkeypatch, tmp_path):
    trainer = _trainer(cls, demo, monkeypatch, tmp_path)
    batch = synthetic_batch(trainer, np.random.default_rng(0))
    _feed(trainer, [batch])
    trainer.on_train_epoch_start()
    before = {k: v.clone() for k, v in trainer.unwrapped_network().state_dict().items()}
    out = trainer.train_step(batch)
    assert set(out) == {"loss", "skipped", *cls.extra_log_keys} and not out.pop("skipped")
    assert all(np.isfinite(v).all() for v in out.values())
    assert not _states_equal(before, trainer.unwrapped_network().state_dict())  # the student stepped
    if hasattr(trainer, "teacher"):  # first update: the teacher becomes the student exactly
        assert _states_equal(trainer.teacher.state_dict(), trainer.unwrapped_network().state_dict())
    if "certain_fraction" in out:
        assert 0.0 <= float(out["certain_fraction"]) <= 1.0


@pytest.mark.parametrize("export_teacher", [False, True])
def test_resume_restores_teacher_and_student_bit_for_bit(export_teacher, demo, monkeypatch, tmp_path):
    hp = {"export_teacher": export_teacher, "mc_passes": 2}
    first = _trainer(UGMCLTrainer, demo, monkeypatch, tmp_path, hp)
    rng = np.random.default_rng(0)
    batches = [synthetic_batch(first, rng) for _ in range(3)]
    _feed(first, batches)
    first.on_train_epoch_start()
    for b in batches[:2]:
        first.train_step(b)
    assert not _states_equal(first.teacher.state_dict(), first.unwrapped_network().state_dict())
    ckpt = tmp_path / "checkpoint.pth"
    first.save_checkpoint(str(ckpt))

    saved = torch.load(ckpt, weights_only=False)
    exported = first.teacher.state_dict() if export_teacher else first.unwrapped_network().state_dict()
    assert _states_equal(saved["network_weights"], exported)
    assert _states_equal(saved["nnunet_ssl"]["teacher"], first.teacher.state_dict())

    second = _trainer(UGMCLTrainer, demo, monkeypatch, tmp_path, hp)
    second.load_checkpoint(str(ckpt))
    assert _states_equal(second.teacher.state_dict(), first.teacher.state_dict())
    assert _states_equal(second.unwrapped_network().state_dict(), first.unwrapped_network().state_dict())
    assert second.global_step == 2 and second.teacher.module.dropout_p == 0.5

    # both continue with the same batch and random numbers: the next step (EMA decay min(1 - 1/3, 0.99)) is identical
    first.current_epoch = 1
    for t in (first, second):
        _feed(t, batches[2:])
        t.on_train_epoch_start()
        torch.manual_seed(1)
        t.train_step(batches[2])
    assert _states_equal(second.teacher.state_dict(), first.teacher.state_dict())
    assert _states_equal(second.unwrapped_network().state_dict(), first.unwrapped_network().state_dict())


def test_exported_teacher_is_what_validation_sees(demo, monkeypatch, tmp_path):
    trainer = _trainer(MeanTeacherTrainer, demo, monkeypatch, tmp_path, {"export_teacher": True})
    batch = synthetic_batch(trainer, np.random.default_rng(0))
    _feed(trainer, [batch, batch])
    trainer.on_train_epoch_start()
    trainer.train_step(batch)
    trainer.train_step(batch)
    student = {k: v.clone() for k, v in trainer.unwrapped_network().state_dict().items()}
    trainer.on_validation_epoch_start()
    assert _states_equal(trainer.unwrapped_network().state_dict(), trainer.teacher.state_dict())
    trainer.logger.log("train_losses", 0.0, 0)
    trainer.on_validation_epoch_end([trainer.validation_step(
        {"data": batch["data"], "target": batch["target"]})])
    assert _states_equal(trainer.unwrapped_network().state_dict(), student)


def test_signed_distance_targets_only_in_the_labeled_pipeline(demo, monkeypatch, tmp_path):
    trainer = _trainer(UGMCLTrainer, demo, monkeypatch, tmp_path)
    rotation, dummy_2d, _, mirror_axes = trainer.configure_rotation_dummyDA_mirroring_and_inital_patch_size()
    args = (trainer.configuration_manager.patch_size, rotation, trainer._get_deep_supervision_scales(), mirror_axes,
            dummy_2d)
    plain = trainer.get_training_transforms(*args)  # e.g. the unlabeled pipeline
    assert type(plain.transforms[-1]).__name__ == "DownsampleSegForDSTransform"
    trainer._labeled_pipeline = True
    labeled = trainer.get_training_transforms(*args)
    assert type(labeled.transforms[-1]).__name__ == "SignedDistanceTransform"
    assert labeled.transforms[-1].labels == [0, 1, 2] and labeled.transforms[-1].spacing == [1.0, 1.0, 1.0]


def _check_teacher_sees_the_unperturbed_patches(trainer, data: torch.Tensor, unlabeled: torch.Tensor) -> None:
    """The teacher's batch of a step ends with ``unlabeled`` as given; then a whole training step with the
    student's perturbation has finite losses."""
    seen = {}

    class Seen(Exception):
        pass

    def teacher_prediction(batch):
        seen["teacher"] = batch
        raise Seen  # stop the step here

    trainer.teacher_prediction = teacher_prediction
    with pytest.raises(Seen):
        trainer.compute_losses(data, None, unlabeled)
    torch.testing.assert_close(seen["teacher"][-len(unlabeled):], unlabeled)
    del trainer.teacher_prediction
    _check_a_whole_step(trainer)


def _check_a_whole_step(trainer) -> None:
    """One training step on a synthetic batch at the trainer's own patch size: not skipped, every loss finite."""
    batch = synthetic_batch(trainer, np.random.default_rng(0))
    _feed(trainer, [batch])
    trainer.on_train_epoch_start()
    out = trainer.train_step(batch)
    assert not out.pop("skipped") and all(np.isfinite(v).all() for v in out.values())


@pytest.mark.parametrize("cls", [MeanTeacherTrainer, UGMCLTrainer])
def test_student_gamma_changes_only_the_students_unlabeled_patches(cls, demo, monkeypatch, tmp_path):
    trainer = _trainer(cls, demo, monkeypatch, tmp_path, {"student_gamma": 1.0})
    data, unlabeled = torch.rand(2, 1, 8, 8, 8), torch.rand(3, 1, 8, 8, 8) * 4 - 1
    patches = torch.cat((data, unlabeled))
    x = trainer.student_input(patches, 2)
    assert torch.equal(x[:2], data) and torch.equal(patches[2:], unlabeled)  # labeled part untouched, input unchanged
    for before, after in zip(unlabeled, x[2:]):
        assert not torch.allclose(before, after)  # a gamma curve ...
        torch.testing.assert_close(after.mean(), before.mean())  # ... keeping the patch's mean and std
        torch.testing.assert_close(after.std(), before.std())
        assert torch.equal(before.flatten().argsort(), after.flatten().argsort())  # monotone: order kept
    _check_teacher_sees_the_unperturbed_patches(trainer, data, unlabeled)

    off = _trainer(cls, demo, monkeypatch, tmp_path / "off")
    assert off.hparams["student_gamma"] == 0.0
    assert off.student_input(patches, 2) is patches  # the papers' batch, not even copied


def test_student_intensity_keeps_da5s_intensity_transforms_only():
    full = nnUNetTrainerDA5.get_training_transforms((32, 32, 32), 0.0, None, (0, 1, 2), False)
    every = {type(leaf).__name__ for t in full.transforms for leaf in _leaves(t)}
    kept = da5_intensity_transforms((32, 32, 32), False)
    names = [type(leaf).__name__ for t in kept.transforms for leaf in _leaves(t)]
    assert set(names) == {"MedianFilterTransform", "GaussianBlurTransform", "GaussianNoiseTransform",
                          "BrightnessAdditiveTransform", "ContrastTransform", "SimulateLowResolutionTransform",
                          "GammaTransform", "BrightnessGradientAdditiveTransform", "LocalGammaTransform",
                          "SharpeningTransform"}
    assert {"SpatialTransform", "MirrorTransform", "BlankRectangleTransform"} <= every - set(names)  # left out
    assert names.count("GammaTransform") == 2 and names.count("ContrastTransform") == 2  # as DA5 has them
    # DA5's own probabilities (per transform and per channel): a patch drawn 200 times is left as it is in about a
    # quarter of the draws
    torch.manual_seed(0)
    np.random.seed(0)
    x = torch.randn(1, 32, 32, 32)
    changed = [not torch.equal(kept(image=x.clone())["image"], x) for _ in range(200)]
    assert 100 < sum(changed) < 200


@pytest.mark.parametrize("cls", [MeanTeacherTrainer, UGMCLTrainer])
def test_student_intensity_changes_only_the_students_unlabeled_patches(cls, demo, monkeypatch, tmp_path):
    trainer = _trainer(cls, demo, monkeypatch, tmp_path, {"student_intensity": 1.0})
    torch.manual_seed(0)
    np.random.seed(0)
    data, unlabeled = torch.rand(2, 1, 16, 16, 16), torch.randn(8, 1, 16, 16, 16)
    patches = torch.cat((data, unlabeled))
    x = trainer.student_input(patches, 2)
    assert torch.equal(x[:2], data) and torch.equal(patches[2:], unlabeled)  # labeled part untouched, input unchanged
    assert any(not torch.equal(a, b) for a, b in zip(unlabeled, x[2:]))  # each at DA5's probabilities
    assert torch.isfinite(x).all()
    _check_teacher_sees_the_unperturbed_patches(trainer, data, unlabeled)


@pytest.mark.parametrize("cls", [MeanTeacherTrainer, UAMTTrainer])
def test_pseudo_label_consistency_loss_is_the_one_trained(cls, demo, monkeypatch, tmp_path):
    hp = {"consistency_loss": "pseudo_label", "confidence_threshold": 0.6, "dropout_p": 0.0}
    trainer = _trainer(cls, demo, monkeypatch, tmp_path, hp)
    torch.manual_seed(0)
    x = torch.randn(2, trainer.num_input_channels, *trainer.configuration_manager.patch_size)
    teacher = trainer.teacher_prediction(x)
    logits = torch.randn(2, trainer.label_manager.num_segmentation_heads, *x.shape[2:]) * 3
    mask = trainer.certainty(teacher) if cls is UAMTTrainer else None
    term, _ = trainer.teacher_consistency(logits, teacher)
    assert term.item() == pytest.approx(pseudo_label_consistency(logits, teacher.probs, 0.6, False, mask).item())
    assert term.item() != pytest.approx(mean_teacher_consistency(probabilities(logits, False), teacher.probs,
                                                                 mask).item())
    _check_a_whole_step(trainer)

    default = _trainer(cls, demo, monkeypatch, tmp_path / "mse", {"dropout_p": 0.0})
    assert default.hparams["consistency_loss"] == "mse"  # the papers' term unless asked
    term, _ = default.teacher_consistency(logits, teacher)
    assert term.item() == pytest.approx(mean_teacher_consistency(probabilities(logits, False), teacher.probs,
                                                                 mask).item())


def test_consistency_loss_is_refused_by_ugmcl_and_checked_elsewhere():
    assert "consistency_loss" in UAMT_HPARAMS and "consistency_loss" not in UGMCL_HPARAMS
    with pytest.raises(HParamError, match="unknown hyper-parameter.*consistency_loss"):
        resolve_hparams(UGMCL_HPARAMS, "UGMCLTrainer", {"consistency_loss": "pseudo_label"})
    with pytest.raises(HParamError, match="'consistency_loss' = 'ce' is invalid: expected one of 'mse', 'pseudo_label'"):
        resolve_hparams(MEAN_TEACHER_HPARAMS, "MeanTeacherTrainer", {"consistency_loss": "ce"})
    with pytest.raises(HParamError, match=r"'confidence_threshold' = 1.5 is invalid: expected a number in \[0.0, 1.0\]"):
        resolve_hparams(MEAN_TEACHER_HPARAMS, "MeanTeacherTrainer", {"confidence_threshold": 1.5})


@pytest.mark.parametrize("images, copied, first_copy, seg, sdf", [
    (range(5), [], 5, [0, 1, 2, 3, 4], [0, 1, 2, 3, 4]),  # the paper's same-view pairs
    (range(5), [3], 5, [0, 1, 2, 4, 3, 5], [0, 1, 2, 4, 5, 3]),  # image 3 and its copy 5, crossed both ways
    (range(2, 5), [2, 4], 5, [3, 2, 5, 4, 6], [3, 5, 2, 6, 4]),  # cross_task_on 'unlabeled', two copies
])
def test_cross_view_pairs_by_hand(images, copied, first_copy, seg, sdf):
    seg_index, sdf_index = cross_view_pairs(images, copied, first_copy)
    assert seg_index.tolist() == seg and sdf_index.tolist() == sdf


@pytest.mark.parametrize("cross_task_on", ["all", "unlabeled"])
def test_dtc_cross_view_gamma_pairs_the_tasks_across_a_contrast_change(cross_task_on, demo, monkeypatch, tmp_path):
    hp = {"dropout_p": 0.0, "cross_view_gamma": 1.0, "cross_task_on": cross_task_on}
    trainer = _trainer(DTCTrainer, demo, monkeypatch, tmp_path, hp)
    batch = synthetic_batch(trainer, np.random.default_rng(0))
    data, unlabeled = batch["data"], torch.randn_like(batch["data"]) * 2 + 1
    n_l, n = len(data), len(data) + len(unlabeled)
    seen = []
    forward = trainer.network.forward
    trainer.network.forward = lambda x, **kw: (seen.append(x), forward(x, **kw))[1]
    out = trainer.compute_losses(data, batch["target"], unlabeled)

    x = seen[0]
    assert x.shape[0] == n + len(unlabeled)  # the batch, then one gamma view per unlabeled patch
    assert torch.equal(x[:n_l], data) and torch.equal(x[n_l:n], unlabeled)
    for before, after in zip(unlabeled, x[n:]):
        assert not torch.allclose(before, after)  # a gamma curve keeping the patch's mean, std and voxel order
        torch.testing.assert_close(after.mean(), before.mean())
        torch.testing.assert_close(after.std(), before.std())
        assert after.flatten()[before.flatten().argsort()].diff().min() > -1e-5  # monotone (up to rounding)
    # eq. 6 by hand on the same forward: same-view pairs for the labeled patches (cross_task_on 'all'), each
    # unlabeled patch's segmentation against its view's level set and the reverse
    with torch.no_grad():
        logits, sdf = forward(x, return_sdf=True)
        p = torch.softmax(trainer.full_resolution(logits).float(), 1)
        level = inverse_sdf_transform(sdf, trainer.hparams["sdf_k"])
    pairs = [(i, i) for i in range(n_l)] if cross_task_on == "all" else []
    pairs += [pair for t in range(len(unlabeled)) for pair in ((n_l + t, n + t), (n + t, n_l + t))]
    expected = torch.stack([(p[a] - level[b]).square().mean() for a, b in pairs]).mean()
    torch.testing.assert_close(out["loss_cross_task"], expected, rtol=1e-4, atol=1e-6)
    _check_a_whole_step(trainer)

    off = _trainer(DTCTrainer, demo, monkeypatch, tmp_path / "off", {**hp, "cross_view_gamma": 0.0})
    seen.clear()
    forward = off.network.forward
    off.network.forward = lambda x, **kw: (seen.append(x), forward(x, **kw))[1]
    off.compute_losses(data, batch["target"], unlabeled)
    assert torch.equal(seen[0], torch.cat((data, unlabeled)))  # the paper's batch, no view added
    assert resolve_hparams(DTC_HPARAMS, "DTCTrainer", {})["cross_view_gamma"] == 0.0
