"""Ramp-up schedules and hyper-parameter validation."""

import json
import math

import pytest
import torch
from conftest import make_trainer

from nnunet_ssl.methods.must.trainer import MUST_HPARAMS
from nnunet_ssl.training.hparams import ENV_VAR, HParamError, read_overrides, resolve_hparams, with_legacy_values
from nnunet_ssl.training.ramps import linear_rampup, rampup, sigmoid_rampup


def test_linear_rampup():
    assert linear_rampup(0, 100) == 0.0
    assert linear_rampup(25, 100) == 0.25
    assert linear_rampup(100, 100) == 1.0
    assert linear_rampup(500, 100) == 1.0
    assert linear_rampup(3, 0) == 1.0


def test_sigmoid_rampup_is_gaussian_with_squared_bracket():
    assert sigmoid_rampup(0, 100) == pytest.approx(math.exp(-5))
    assert sigmoid_rampup(50, 100) == pytest.approx(math.exp(-5 * 0.25))
    assert sigmoid_rampup(100, 100) == 1.0
    assert sigmoid_rampup(1000, 100) == 1.0
    with pytest.raises(ValueError, match="unknown ramp-up"):
        rampup("cosine", 1, 10)


def test_defaults_are_the_papers_but_the_weight():
    h = resolve_hparams(MUST_HPARAMS, "MuSTTrainer", {})
    assert h["temperature"] == 0.8 and h["rampup"] == "linear"
    # the paper's w_u = 30 fell far below nnU-Net with nnU-Net's loss (docs/benchmarks.md); 3 is the default
    assert h["consistency_weight"] == 3.0 and h["scale_reduction"] == "mean"


def test_overrides_are_validated():
    h = resolve_hparams(MUST_HPARAMS, "MuSTTrainer", {"temperature": 0.5, "num_epochs": 3})
    assert h["temperature"] == 0.5 and h["num_epochs"] == 3
    with pytest.raises(HParamError, match="unknown hyper-parameter.*temprature"):
        resolve_hparams(MUST_HPARAMS, "MuSTTrainer", {"temprature": 0.5})
    with pytest.raises(HParamError, match="'temperature' = -1"):
        resolve_hparams(MUST_HPARAMS, "MuSTTrainer", {"temperature": -1})
    with pytest.raises(HParamError, match="'num_epochs' = 2.5.*an integer"):
        resolve_hparams(MUST_HPARAMS, "MuSTTrainer", {"num_epochs": 2.5})
    with pytest.raises(HParamError, match="'rampup' = 'cos'.*one of"):
        resolve_hparams(MUST_HPARAMS, "MuSTTrainer", {"rampup": "cos"})
    with pytest.raises(HParamError, match="'num_epochs' = True"):
        resolve_hparams(MUST_HPARAMS, "MuSTTrainer", {"num_epochs": True})


def test_read_overrides_from_json_or_file(tmp_path):
    assert read_overrides({ENV_VAR: '{"temperature": 0.5}'}) == {"temperature": 0.5}
    f = tmp_path / "h.json"
    f.write_text(json.dumps({"num_epochs": 2}))
    assert read_overrides({ENV_VAR: str(f)}) == {"num_epochs": 2}
    assert read_overrides({}) == {}
    with pytest.raises(HParamError, match="neither a JSON object nor an existing JSON file"):
        read_overrides({ENV_VAR: "missing.json"})
    with pytest.raises(HParamError, match="not valid JSON"):
        read_overrides({ENV_VAR: "{temperature: 1}"})
    with pytest.raises(HParamError, match="must hold a JSON object"):
        f.write_text("[1, 2]")
        read_overrides({ENV_VAR: str(f)})


def test_checkpoint_without_a_later_setting_resumes_as_trained(demo, monkeypatch, tmp_path):
    """A MuST checkpoint written before ``scale_reduction`` existed was trained with eq. 3 summed: ``--c`` keeps
    that, while a new training gets the default."""
    trainer = make_trainer(demo, "MuSTTrainer", monkeypatch, tmp_path / "a")
    trainer.initialize()
    ckpt = tmp_path / "old.pth"
    trainer.save_checkpoint(str(ckpt))
    state = torch.load(ckpt, weights_only=False)
    del state["nnunet_ssl"]["hparams"]["scale_reduction"]
    torch.save(state, ckpt)

    resumed = make_trainer(demo, "MuSTTrainer", monkeypatch, tmp_path / "b")
    assert resumed.hparams["scale_reduction"] == "mean" and "scale_reduction" not in resumed.hparams_set
    resumed.initialize()
    resumed.load_checkpoint(str(ckpt))
    assert resumed.hparams["scale_reduction"] == "sum"
    assert with_legacy_values(MUST_HPARAMS, {"scale_reduction": "mean"}) == {"scale_reduction": "mean"}


def test_final_validation_mirroring_may_change_on_resume_and_turns_mirroring_off(demo, monkeypatch, tmp_path):
    """``final_validation_mirroring`` is read only by the final validation: ``--c`` with another value resumes (a
    training setting that differs is still refused), and false hands nnU-Net's validation no mirroring axes while
    the trainer keeps them for its checkpoints (nnUNetv2_predict mirrors along them)."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    from nnunet_ssl.training import supervised
    from nnunet_ssl.training.supervised import SupervisedTrainer

    trainer = make_trainer(demo, "SupervisedTrainer", monkeypatch, tmp_path / "a")
    assert trainer.hparams["final_validation_mirroring"] is True
    trainer.initialize()
    ckpt = tmp_path / "latest.pth"
    trainer.save_checkpoint(str(ckpt))

    resumed = make_trainer(demo, "SupervisedTrainer", monkeypatch, tmp_path / "b",
                           {"final_validation_mirroring": False})
    resumed.initialize()
    resumed.load_checkpoint(str(ckpt))
    assert resumed.hparams["final_validation_mirroring"] is False
    other = make_trainer(demo, "SupervisedTrainer", monkeypatch, tmp_path / "c",
                         {"final_validation_mirroring": False, "num_epochs": 7})
    other.initialize()
    with pytest.raises(HParamError, match=r"'num_epochs': \(1, 7\)"):
        other.load_checkpoint(str(ckpt))
    # a name left out of nnUNet_ssl_hparams takes the checkpoint's value (--val with only this setting)
    monkeypatch.setenv(ENV_VAR, json.dumps({"final_validation_mirroring": False}))
    plans = {**json.loads((demo.pp / "nnUNetPlans.json").read_text()), "continue_training": False}
    only = SupervisedTrainer(plans, "2d", 0, trainer.dataset_json, torch.device("cpu"))
    assert only.num_epochs == 1000
    only.initialize()
    only.load_checkpoint(str(ckpt))
    assert only.hparams == {**trainer.hparams, "final_validation_mirroring": False} and only.num_epochs == 1

    seen = []
    monkeypatch.setattr(nnUNetTrainer, "perform_actual_validation",
                        lambda self, save_probabilities=False: seen.append(self.inference_allowed_mirroring_axes))
    monkeypatch.setattr(supervised, "validation_calibration", lambda *a, **k: {
        "pooled": {"foreground": {"ECE": 0.0}, "all": {"ECE": 0.0}}})
    for t in (trainer, resumed):
        t.inference_allowed_mirroring_axes = (0, 1)
        t.perform_actual_validation()
        assert t.inference_allowed_mirroring_axes == (0, 1)
    assert seen == [(0, 1), None]
