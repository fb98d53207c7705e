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
    assert resumed.hparams["scale_reduction"] == "mean"
    resumed.hparams_from_env = False  # as with nnUNet_ssl_hparams unset: the checkpoint's values apply
    resumed.initialize()
    resumed.load_checkpoint(str(ckpt))
    assert resumed.hparams["scale_reduction"] == "sum"
    assert with_legacy_values(MUST_HPARAMS, {"scale_reduction": "mean"}) == {"scale_reduction": "mean"}
