"""Trainer discovery through nnUNet_extTrainer, for the source tree and for a regular (wheel) install."""

from __future__ import annotations

import pickle
import subprocess
import sys
import zipfile

from conftest import REPO
from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

from nnunet_ssl.ext_trainers_path import trainers_path
from nnunet_ssl.methods.must.trainer import MuSTTrainer


def test_nnunet_finds_the_trainers_through_the_shims(monkeypatch):
    monkeypatch.setenv("nnUNet_extTrainer", str(trainers_path()))
    for name in ("MuSTTrainer", "SupervisedTrainer", "UGMCLTrainer", "MeanTeacherTrainer", "UAMTTrainer",
                 "DTCTrainer"):
        cls = recursive_find_trainer_class_by_name(name)
        assert cls.__name__ == name and cls.__module__.startswith("nnunet_ssl.")
    # the class nnU-Net returns is the package's (picklable by name), not a copy from the shim module
    assert recursive_find_trainer_class_by_name("MuSTTrainer") is MuSTTrainer
    assert pickle.loads(pickle.dumps(MuSTTrainer)) is MuSTTrainer


def test_wheel_ships_the_shims(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", str(REPO),
                    "-w", str(tmp_path)], check=True, capture_output=True)
    wheel = next(tmp_path.glob("nnunet_ssl-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "nnunet_ssl/ext_trainers/nnunet_ssl_trainers.py" in names
    shim = zipfile.ZipFile(wheel).read("nnunet_ssl/ext_trainers/nnunet_ssl_trainers.py").decode()
    assert "from nnunet_ssl.methods.must.trainer import MuSTTrainer" in shim
    assert any(n.endswith("entry_points.txt") for n in names)
