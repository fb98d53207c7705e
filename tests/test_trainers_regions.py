"""Every trainer trains on a region-based dataset with an ignore label: real batches from nnU-Net's loaders (region
channels, ignore mask), finite losses, a step taken in each iteration."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import first_losses, make_trainer

from nnunet_ssl.trainers import TRAINERS


@pytest.mark.parametrize("name", list(TRAINERS))
def test_regions_and_ignore_label_train(name, demo_regions_ignore, monkeypatch, tmp_path):
    trainer = make_trainer(demo_regions_ignore, name, monkeypatch, tmp_path, configuration="3d_fullres")
    assert trainer.label_manager.has_regions and trainer.label_manager.has_ignore_label
    outputs = first_losses(trainer, 2)
    for out in outputs:
        assert not out.pop("skipped")
        assert set(out) == {"loss", *trainer.extra_log_keys}
        assert all(np.isfinite(v) for v in out.values()), out
