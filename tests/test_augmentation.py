"""The ``augmentation`` hyper-parameter: nnUNetTrainerDA5's transforms for every training batch a trainer draws
(labeled, unlabeled, pairs, pseudo-labeled). That ``--c`` keeps it, refuses another and that prediction is unaffected
is checked on MeanTeacherTrainer in ``test_interruption.py``."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import make_trainer
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.training.nnUNetTrainer.variants.data_augmentation.nnUNetTrainerDA5 import nnUNetTrainerDA5

from nnunet_ssl.trainers import TRAINERS
from nnunet_ssl.training.hparams import HParamError, resolve_hparams
from nnunet_ssl.training.supervised import SCHEDULE_HPARAMS, SupervisedTrainer

SOURCES = {"default": nnUNetTrainer, "da5": nnUNetTrainerDA5}


def _record_pipelines(monkeypatch) -> dict[str, list]:
    """Wrap both nnU-Net trainers' pipeline builders; returns the pipelines each one built, by augmentation name."""
    built: dict[str, list] = {name: [] for name in SOURCES}
    for name, cls in SOURCES.items():
        original = cls.get_training_transforms

        def spy(*args, _original=original, _name=name, **kwargs):
            pipeline = _original(*args, **kwargs)
            built[_name].append(pipeline)
            return pipeline

        monkeypatch.setattr(cls, "get_training_transforms", staticmethod(spy))
    return built


def _training_loaders(trainer) -> dict[str, object]:
    """The trainer's training loaders (single-threaded: nnUNet_n_proc_DA=0), by attribute name."""
    return {k: v for k, v in vars(trainer).items()
            if k != "dataloader_val" and hasattr(getattr(v, "data_loader", None), "transforms")}


@pytest.mark.parametrize("name, augmentation", [(n, "da5") for n in sorted(TRAINERS)]
                         + [("POPCORNTrainer", "default"), ("MuSTTrainer", "default")])
def test_every_training_loader_uses_the_chosen_augmentation(name, augmentation, demo, monkeypatch, tmp_path):
    built = _record_pipelines(monkeypatch)
    trainer = make_trainer(demo, name, monkeypatch, tmp_path / "results", {"augmentation": augmentation})
    trainer.on_train_start()
    try:
        trainer.on_train_epoch_start()
        for _ in range(2):  # LocalContrastiveTrainer (QUICK) starts its pseudo-labeled loader in the second
            losses = trainer.train_step(next(trainer.dataloader_train))
            assert all(np.isfinite(v) for v in losses.values() if np.ndim(v) == 0)
        loaders = _training_loaders(trainer)
        # POPCORN's unlabeled images enter as pseudo-labeled cases of its labeled (pair) loader
        draws_unlabeled = name not in ("SupervisedTrainer", "POPCORNTrainer")
        assert sorted(loaders) == ["dataloader_train"] + (["dataloader_unlabeled"] if draws_unlabeled else [])
        other = next(n for n in SOURCES if n != augmentation)
        assert not built[other]  # the other augmentation never built a pipeline
        for loader in loaders.values():
            assert any(loader.data_loader.transforms is p for p in built[augmentation])
        # the initial (pre-rotation) patch size is the chosen augmentation's too (DA5 scales 0.7-1.43)
        initial = SOURCES[augmentation].configure_rotation_dummyDA_mirroring_and_inital_patch_size(trainer)[2]
        for loader in loaders.values():
            assert list(loader.data_loader.patch_size[-len(initial):]) == list(initial)
        labeled = loaders["dataloader_train"].data_loader.transforms.transforms
        if name == "UGMCLTrainer":  # the method's own addition to the labeled pipeline stays
            assert type(labeled[-1]).__name__ == "SignedDistanceTransform"
        if name == "LocalContrastiveTrainer":  # outside-mask voxels keep their own label in DA5's pipeline too
            removers = [t for t in labeled if type(t).__name__ == "RemoveLabelTransform" and t.label_value == -1]
            assert len(removers) == 1 and removers[0].set_to == trainer.outside_value
    finally:
        if hasattr(trainer, "shutdown_unlabeled_dataloader"):
            trainer.shutdown_unlabeled_dataloader()


def test_unknown_augmentation_is_rejected_by_name():
    with pytest.raises(HParamError, match=r"'augmentation' = 'DA5' is invalid: expected one of 'default', 'da5'"):
        resolve_hparams(SCHEDULE_HPARAMS, "SupervisedTrainer", {"augmentation": "DA5"})


class _SupervisedDA5Mixin(SupervisedTrainer, nnUNetTrainerDA5):  # nnU-Net's way: a variant mixed in by subclassing
    pass


def test_default_keeps_an_nnunet_variant_mixed_in(demo, monkeypatch, tmp_path):
    built = _record_pipelines(monkeypatch)
    trainer = make_trainer(demo, "SupervisedTrainer", monkeypatch, tmp_path / "results",
                           trainer_cls=_SupervisedDA5Mixin)
    assert trainer.hparams["augmentation"] == "default"
    trainer.on_train_start()
    assert built["da5"] and not built["default"]
    assert trainer.dataloader_train.data_loader.transforms is built["da5"][0]
