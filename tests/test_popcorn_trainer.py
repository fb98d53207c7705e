"""POPCORNTrainer in-process on the tiny demo datasets: pairs from nnU-Net's loader, the training step, selection
rounds with pseudo-labels from nnU-Net's predictor, state that survives interruptions, regions + ignore label."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

from nnunet_ssl.ext_trainers_path import trainers_path
from nnunet_ssl.methods.popcorn.sampling import PairedDataLoader
from nnunet_ssl.methods.popcorn.selection import derive_schedule, select_random
from nnunet_ssl.methods.popcorn.trainer import PSEUDO_LABEL_FOLDER, STATE_FILE, POPCORNTrainer
from nnunet_ssl.training.hparams import HParamError
from nnunet_ssl.training.pseudo_labels import inference_mode, make_predictor, predict_logits


@pytest.fixture
def make(monkeypatch, tmp_path):
    """``make(env, hparams)``: an initialized POPCORNTrainer on fold 0 of ``env`` (results in a temporary folder,
    single-threaded data loading)."""

    def _make(env, hparams: dict | None = None, batch_size: int | None = None, initialize: bool = True,
              configuration: str = "3d_fullres"):
        for k, v in env.vars.items():
            monkeypatch.setenv(k, v)
        monkeypatch.setenv("nnUNet_results", str(tmp_path / "results"))
        monkeypatch.setenv("nnUNet_n_proc_DA", "0")
        monkeypatch.setenv("nnUNet_ssl_hparams", json.dumps(hparams or {}))
        plans = {**json.loads((env.pp / "nnUNetPlans.json").read_text()), "continue_training": False}
        if batch_size is not None:
            plans["configurations"][configuration]["batch_size"] = batch_size
        dataset_json = json.loads((env.pp / "dataset.json").read_text())
        trainer = POPCORNTrainer(plans, configuration, 0, dataset_json, torch.device("cpu"))
        if initialize:
            trainer.initialize()
        return trainer

    return _make


def test_nnunet_finds_popcorn_through_the_shims(monkeypatch):
    monkeypatch.setenv("nnUNet_extTrainer", str(trainers_path()))
    assert recursive_find_trainer_class_by_name("POPCORNTrainer") is POPCORNTrainer


def test_pairs_from_nnunet_loader(demo, make):
    trainer = make(demo)
    loader = trainer.get_paired_training_dataloader().data_loader
    assert isinstance(loader, PairedDataLoader) and loader.batch_size == 2
    assert loader.pair_foreground_probability == 0.5  # nnU-Net forces 1 of 2 patches onto foreground
    np.random.seed(0)
    torch.manual_seed(0)
    loader.same_patch_probability = 1.0
    images_differ = 0
    for _ in range(8):
        batch = next(loader)
        assert batch["keys"][0] == batch["keys"][1]
        seg = batch["target"][0]  # full resolution (deep supervision list)
        # same crop and the same geometric augmentation (nnU-Net mirrors each axis with p = 0.5, rotates and scales
        # with p = 0.2): the labels match voxel by voxel; intensity augmentations are drawn independently
        assert torch.equal(seg[0], seg[1])
        images_differ += not torch.equal(batch["data"][0], batch["data"][1])
    assert images_differ > 0
    loader.same_patch_probability = 0.0
    for _ in range(4):
        keys = next(loader)["keys"]
        assert keys[0] != keys[1]  # two different cases

    # the partner's crop centre sits at the same fraction of each axis, within nnU-Net's allowed range
    p = loader.patch_size
    lbs = loader.same_relative_position([6 - p[0] // 2, 12 - p[1] // 2, 18 - p[2] // 2], (24, 24, 24), (48, 96, 24))
    low, high = loader.bbox_range((48, 96, 24))
    expected = [int(np.clip(round(c - s / 2), lo, hi)) for c, s, lo, hi in zip((12, 48, 18), p, low, high)]
    assert lbs == expected and expected[1] == 48 - round(p[1] / 2)
    lbs = loader.same_relative_position([high_ for high_ in loader.bbox_range((24, 24, 24))[1]], (24, 24, 24),
                                        (30, 30, 30))
    assert all(lo <= b <= hi for b, lo, hi in zip(lbs, *loader.bbox_range((30, 30, 30))))

    # an odd batch: the last patch is drawn and oversampled as nnU-Net does it
    odd = PairedDataLoader(loader._data, 3, loader.patch_size, loader.final_patch_size, trainer.label_manager,
                           oversample_foreground_percent=0.33)
    assert odd.num_pairs == 1 and odd.pair_foreground_probability == pytest.approx(1 / 3)
    assert len(next(odd)["keys"]) == 3 and odd._pair_do_oversample(2) is True  # round(3 * 0.67) = 2
    with pytest.raises(ValueError, match="batch size >= 2"):
        PairedDataLoader(loader._data, 1, loader.patch_size, loader.final_patch_size, trainer.label_manager)


def test_training_step_on_pairs(demo, make):
    trainer = make(demo, {"alpha": 0.2})
    loader = trainer.get_paired_training_dataloader()
    trainer.network.train()
    batch = next(loader)
    data = batch["data"]
    target = batch["target"]
    losses = trainer.compute_losses(data, target)
    assert losses["loss"].item() == pytest.approx(
        losses["loss_segmentation"].item() + 0.1 * losses["loss_regularization"].item(), rel=1e-5)
    assert 0 < losses["pair_similarity"].item() <= 1 and losses["loss_regularization"].item() >= 0
    # L_reg reaches every encoder parameter (h depends on all encoder stages) and no decoder parameter
    losses["loss_regularization"].backward(retain_graph=True)
    for name, p in trainer.network.named_parameters():
        assert (p.grad is not None and p.grad.abs().sum() > 0) == name.startswith("encoder."), name
    # the total reaches every parameter nnU-Net's own loss reaches (nnU-Net gives the lowest deep-supervision
    # output weight 0 outside DDP and 1e-6 under DDP, so that every parameter gets a gradient there)
    trainer.network.zero_grad(set_to_none=True)
    losses["loss"].backward(retain_graph=True)
    with_grad = {n for n, p in trainer.network.named_parameters() if p.grad is not None}
    trainer.network.zero_grad(set_to_none=True)
    losses["loss_segmentation"].backward()
    assert with_grad == {n for n, p in trainer.network.named_parameters() if p.grad is not None}
    # the bottleneck is the encoder's deepest output, taken from the same forward as nnU-Net's outputs
    trainer.network.eval()
    with torch.no_grad():
        out, h = trainer.network(data, return_bottleneck=True)
        assert torch.equal(h, trainer.network.encoder(data)[-1])
        assert all(torch.equal(a, b) for a, b in zip(out, trainer.network(data)))


def _image_shape(trainer, case):
    return trainer.unlabeled_images().load_case(case)[0].shape


def test_selection_round_integrates_k_cases(demo, make):
    trainer = make(demo, {"num_epochs": 4, "selection_size": 3, "first_step_epochs": 1})
    trainer.unlabeled_identifiers = trainer.prepare_unlabeled_data()
    s = trainer.schedule
    assert (s.num_unlabeled, s.selection_size, s.num_rounds, s.first_step_epochs, s.epochs_per_round) == \
        (4, 3, 2, 1, 1)
    trainer.dataloader_train = trainer.get_paired_training_dataloader()
    labeled = trainer.do_split()[0]
    unlabeled = trainer.unlabeled_identifiers

    # the latent representation: bottleneck features averaged over the sliding-window tiles and positions
    # (a 24^3 image is one tile of the 24^3 patch)
    reps = trainer.latent_representations(labeled, unlabeled)
    case = unlabeled[0]
    image = torch.from_numpy(np.asarray(trainer.unlabeled_images().load_case(case)[0][:], dtype=np.float32))
    trainer.network.eval()
    with torch.no_grad():
        expected = trainer.network.encoder(image[None])[-1].mean((0, 2, 3, 4)).numpy()
    assert np.allclose(reps[case], expected, atol=1e-5)

    trainer.current_epoch = 1
    record = trainer.selection_round()
    # each label's share of the annotated voxels of the round's pseudo-labels, counted with numpy
    segs = [np.asarray(trainer.store.load(c)[0][:]) for c in record["selected"]]
    annotated = sum(int((seg >= 0).sum()) for seg in segs)
    assert record["label_shares"] == {str(v): pytest.approx(sum(int((seg == v).sum()) for seg in segs) / annotated,
                                                            abs=1e-5) for v in (1, 2)}
    # eq. 6-7 recomputed with numpy: Euclidean distances to the 4 labeled cases, p = 5 > 4 -> the sum of all
    scores = {u: sum(np.linalg.norm(reps[u].astype(np.float64) - reps[t]) for t in labeled) for u in unlabeled}
    ranking = sorted(unlabeled, key=lambda u: (scores[u], u))
    assert record["selected"] == ranking[:3]
    assert "alignment_offsets" not in record  # pseudo_label_alignment is off by default
    assert np.allclose(record["scores"], [scores[u] for u in ranking[:3]], rtol=1e-4)
    assert trainer.pseudo_labeled_cases() == ranking[:3]
    # pseudo-label files with the preprocessed image's shape, written before the round was recorded
    for c in ranking[:3]:
        seg, props = trainer.store.load(c)
        assert seg.shape == (1, *_image_shape(trainer, c)[1:])
        assert set(np.unique(seg[:])) <= {-1, 0, 1, 2} and "class_locations" in props
    assert trainer.store.folder.name == PSEUDO_LABEL_FOLDER and trainer.store.folder.parent.name == "fold_0"
    # nnU-Net's loader now draws from the labeled and the pseudo-labeled cases
    assert trainer.dataloader_train.data_loader.indices == sorted(labeled + ranking[:3])
    log = json.loads((trainer.store.folder.parent / STATE_FILE).read_text())
    assert [e["case"] for e in log["rounds"][0]["selected"]] == ranking[:3] and log["remaining"] == 1

    trainer.current_epoch = 2
    trainer.on_train_epoch_start()  # round 2 is due: the last case
    assert trainer.pseudo_labeled_cases() == ranking[:3] + ranking[3:] and len(trainer.rounds) == 2
    assert trainer.rounds[1]["training_cases"] == 4 + 3 and trainer.rounds[1]["candidates"] == 1
    trainer.current_epoch = 3
    trainer.on_train_epoch_start()  # nothing left
    assert len(trainer.rounds) == 2

    # the state goes through the checkpoint entry into a new trainer
    state = trainer.extra_checkpoint_state()
    resumed = make(demo, {"num_epochs": 4, "selection_size": 3, "first_step_epochs": 1})
    resumed.load_extra_checkpoint_state(state)
    resumed.unlabeled_identifiers = resumed.prepare_unlabeled_data()
    assert resumed.rounds == trainer.rounds and resumed.pseudo_labeled_cases() == ranking
    # a value left null resumes as the checkpoint has it (the default E1 would be 2 here: a checkpoint of a version
    # with another default keeps its schedule); a value set against the checkpoint is refused
    null = make(demo, {"num_epochs": 4, "selection_size": 3})
    assert derive_schedule(4, 4, 3).first_step_epochs == 2
    null.load_extra_checkpoint_state(copy.deepcopy(state))
    null.unlabeled_identifiers = null.prepare_unlabeled_data()
    assert null.schedule == s and null.rounds == trainer.rounds
    assert "POPCORN resumes with the checkpoint's schedule (first_step_epochs 1" in Path(null.log_file).read_text()
    other = make(demo, {"num_epochs": 4, "selection_size": 3, "first_step_epochs": 2})
    other.load_extra_checkpoint_state(copy.deepcopy(state))
    with pytest.raises(HParamError, match="value set in nnUNet_ssl_hparams changed"):
        other.prepare_unlabeled_data()


def test_random_selection_ablation_draws_from_seed_and_round(demo, make):
    """selection 'random' (section 4.1's ablation without proximity graph): a round takes the cases drawn from
    (seed, round number), not the closest ones; a new trainer at the same round (as after --c) draws the same."""
    hp = {"num_epochs": 4, "selection_size": 2, "first_step_epochs": 1}

    def first_round(trainer):
        trainer.unlabeled_identifiers = trainer.prepare_unlabeled_data()
        trainer.dataloader_train = trainer.get_paired_training_dataloader()
        trainer.current_epoch = 1
        return trainer.selection_round()

    closest = first_round(make(demo, {**hp, "seed": 0}))["selected"]
    unlabeled = sorted(make(demo, hp).prepare_unlabeled_data())
    # a seed whose draw is not the proximity ranking's first two, so the test tells the two selections apart
    draws = {s: [unlabeled[i] for i in select_random(unlabeled, 2, np.random.default_rng([s, 1]))] for s in range(100)}
    seed, expected = next((s, d) for s, d in draws.items() if d != closest)
    trainer = make(demo, {**hp, "seed": seed, "selection": "random"})
    record = first_round(trainer)
    assert record["selected"] == expected != closest
    assert trainer.pseudo_labeled_cases() == expected and len(record["scores"]) == 2
    assert first_round(make(demo, {**hp, "seed": seed, "selection": "random"}))["selected"] == expected
    with pytest.raises(HParamError, match="'selection' = 'nearest' is invalid: expected one of 'proximity', "
                                          "'random'"):
        make(demo, {"selection": "nearest"}, initialize=False)


def test_interrupted_round_leaves_a_consistent_state(demo, make, monkeypatch):
    trainer = make(demo, {"num_epochs": 4, "selection_size": 2})
    trainer.unlabeled_identifiers = trainer.prepare_unlabeled_data()
    trainer.dataloader_train = trainer.get_paired_training_dataloader()
    trainer.current_epoch = 1
    first = trainer.selection_round()["selected"]
    state = trainer.extra_checkpoint_state()  # the checkpoint written at the end of this epoch
    log_file = trainer.store.folder.parent / STATE_FILE
    log_before = log_file.read_text()

    # the next round is killed after its first pseudo-label file was written
    write = trainer.store.write
    calls = []

    def write_then_die(case, *args, **kwargs):
        calls.append(case)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")
        write(case, *args, **kwargs)

    monkeypatch.setattr(trainer.store, "write", write_then_die)
    trainer.current_epoch = 2
    with pytest.raises(KeyboardInterrupt):
        trainer.selection_round()
    assert trainer.pseudo_labeled_cases() == first and log_file.read_text() == log_before
    assert trainer.store.has(calls[0])  # a file no state names

    # a named case whose files went missing is predicted again; the unnamed file is removed
    trainer.store.seg_file(first[1]).unlink()
    resumed = make(demo, {"num_epochs": 4, "selection_size": 2})
    resumed.load_extra_checkpoint_state(state)
    resumed.unlabeled_identifiers = resumed.prepare_unlabeled_data()
    assert resumed.pseudo_labeled_cases() == first
    assert sorted(resumed.store.cases()) == sorted(first) and not resumed.store.has(calls[0])
    assert sorted(p.name for p in resumed.store.folder.iterdir()) == sorted(
        f"{c}{suffix}" for c in first for suffix in (".pkl", "_seg.b2nd"))
    assert json.loads(log_file.read_text())["pseudo_labeled"] == first

    # a resume with other unlabeled images than the checkpoint's rounds were chosen among is refused
    state["popcorn"]["unlabeled_cases"] = state["popcorn"]["unlabeled_cases"][:-1]
    other = make(demo, {"num_epochs": 4, "selection_size": 2})
    other.load_extra_checkpoint_state(state)
    with pytest.raises(HParamError, match="unlabeled images changed"):
        other.prepare_unlabeled_data()


def test_round_warns_when_pseudo_labels_miss_a_class(demo, make, monkeypatch):
    """A model that has not learned a class yet leaves it out of its pseudo-labels: the round says so in the log,
    with the cases, the shares and, in round 1, the setting to change."""
    trainer = make(demo, {"num_epochs": 5, "selection_size": 1, "first_step_epochs": 1})  # rounds at epochs 1 to 4
    trainer.unlabeled_identifiers = trainer.prepare_unlabeled_data()
    trainer.dataloader_train = trainer.get_paired_training_dataloader()
    write = trainer.store.write

    def cycling(labels):  # pseudo-labels with the given labels in turn inside the mask, whatever the model predicts
        def write_cycle(case, seg, *args, **kwargs):
            cycle = np.asarray(labels, dtype=seg.dtype)[np.arange(seg.size).reshape(seg.shape) % len(labels)]
            write(case, np.where(seg >= 0, cycle, seg), *args, **kwargs)
        return write_cycle

    monkeypatch.setattr(trainer.store, "write", cycling([0, 1]))  # label 1 half the voxels, label 2 none
    trainer.current_epoch = 1
    record = trainer.selection_round()
    assert record["label_shares"] == {"1": pytest.approx(0.5, abs=0.01), "2": 0.0}
    labeled = [np.asarray(trainer.labeled_images().load_case(c)[1][:]) for c in trainer.do_split()[0]]
    shares = {v: sum(int((s == v).sum()) for s in labeled) / sum(int((s >= 0).sum()) for s in labeled) for v in (1, 2)}
    log = Path(trainer.log_file).read_text()
    name = next(k for k, v in trainer.dataset_json["labels"].items() if v == 2)
    assert (f"POPCORN warning: in round 1's pseudo-labels ({', '.join(record['selected'])}) {name} makes 0.0% of "
            f"the annotated voxels against {100 * shares[2]:.1f}% in the labeled cases") in log
    assert "first_step_epochs, now 1" in log and log.count("POPCORN warning") == 1  # label 1 is not short

    trainer.current_epoch = 2  # still short: the model has not learned it since the first step
    trainer.selection_round()
    log = Path(trainer.log_file).read_text()
    assert log.count("POPCORN warning") == 2 and "yet (short in every round): if" in log

    # a third of the voxels each: both labels at least half as common as in the labeled cases
    assert max(shares.values()) < 2 / 3
    monkeypatch.setattr(trainer.store, "write", cycling([0, 1, 2]))
    trainer.current_epoch = 3
    trainer.selection_round()
    assert Path(trainer.log_file).read_text().count("POPCORN warning") == 2

    monkeypatch.setattr(trainer.store, "write", cycling([0, 1]))  # short again after a good round: not the first step
    trainer.current_epoch = 4
    fourth = trainer.selection_round()
    log = Path(trainer.log_file).read_text()
    assert log.count("POPCORN warning") == 3 and log.count("first_step_epochs, now") == 2
    assert f"in round 4's pseudo-labels ({fourth['selected'][0]}) {name} makes 0.0%" in log
    assert "carry the model's errors on images unlike the labeled ones" in log


def test_aligned_pseudo_labels_take_the_labeled_shares(demo, make, monkeypatch):
    """pseudo_label_alignment: each round's pseudo-label is the argmax of nnU-Net's sliding-window logits plus the
    recorded offsets, its foreground labels take the labeled cases' shares of its foreground, and the shares the
    model predicted before the offsets are recorded for the label-share check."""
    trainer = make(demo, {"num_epochs": 4, "selection_size": 2, "first_step_epochs": 1,
                          "pseudo_label_alignment": True})
    trainer.unlabeled_identifiers = trainer.prepare_unlabeled_data()
    trainer.dataloader_train = trainer.get_paired_training_dataloader()
    trainer.current_epoch = 1
    record = trainer.selection_round()
    labeled = [np.asarray(trainer.labeled_images().load_case(c)[1][:]) for c in trainer.do_split()[0]]
    wanted = sum(int((s == 1).sum()) for s in labeled) / sum(int((s > 0).sum()) for s in labeled)
    assert set(record["alignment_offsets"]) == set(record["selected"])
    before = {1: 0, 2: 0}
    annotated = 0
    for case in record["selected"]:
        offsets = torch.tensor(record["alignment_offsets"][case])
        assert offsets[0] == 0 and float(offsets.sum()) == pytest.approx(0, abs=1e-3)
        data, nonzero, _, _ = trainer.unlabeled_images().load_case(case)
        with inference_mode(trainer) as net:
            logits = predict_logits(make_predictor(trainer, net), data)
        seg = np.asarray(trainer.store.load(case)[0][0][:])
        inside = np.asarray(nonzero[0][:]) >= 0
        assert np.array_equal(seg[inside], (logits + offsets[:, None, None, None]).argmax(0).numpy()[inside])
        assert (seg == 1).sum() / (seg > 0).sum() == pytest.approx(wanted, rel=0.02)
        plain = logits.argmax(0).numpy()[inside]
        before = {v: before[v] + int((plain == v).sum()) for v in before}
        annotated += int(inside.sum())
    # the model's own shares (the argmax without offsets) are recorded, and the label-share check reads them
    assert record["label_shares_unaligned"] == {str(v): pytest.approx(n / annotated, abs=1e-5)
                                                for v, n in before.items()}
    checked = []
    monkeypatch.setattr(trainer, "check_label_shares", lambda number, shares, cases: checked.append(shares))
    trainer.current_epoch = 2
    second = trainer.selection_round()
    unaligned = {int(v): x for v, x in second["label_shares_unaligned"].items()}
    assert len(checked) == 1 and checked[0] == pytest.approx(unaligned, abs=1e-5)
    assert checked[0] != pytest.approx({int(v): x for v, x in second["label_shares"].items()}, abs=1e-3)
    # a class missing from the predictions is reported as such, with what the alignment did to it
    POPCORNTrainer.check_label_shares(trainer, 3, {1: 0.0, 2: 0.0}, ["case_x"])
    log = Path(trainer.log_file).read_text()
    assert "POPCORN warning: in round 3's predictions before pseudo_label_alignment (case_x)" in log
    assert "The alignment gave the pseudo-labels the labeled cases' shares" in log


def test_bad_settings_fail_before_training(demo, make):
    with pytest.raises(HParamError, match="first_step_epochs = 5 must be below num_epochs = 5"):
        make(demo, {"num_epochs": 5, "first_step_epochs": 5}, initialize=False)
    with pytest.raises(HParamError, match="'selection_size' = 0"):
        make(demo, {"selection_size": 0}, initialize=False)
    trainer = make(demo, {"num_epochs": 3, "selection_size": 1, "epochs_per_round": 1, "first_step_epochs": 1})
    with pytest.raises(HParamError, match="last round would start at epoch 4 but num_epochs = 3"):
        trainer.prepare_unlabeled_data()  # 4 unlabeled cases, one per round from epoch 1
    with pytest.raises(ValueError, match="batch size >= 2"):
        make(demo, batch_size=1)


def test_alignment_refused_for_regions(demo_regions_ignore, make):
    with pytest.raises(HParamError, match="pseudo_label_alignment = true needs mutually exclusive labels"):
        make(demo_regions_ignore, {"pseudo_label_alignment": True}, initialize=False)


@pytest.mark.slow
def test_regions_and_ignore_label_across_a_round(demo_regions_ignore, make):
    env = demo_regions_ignore
    trainer = make(env, {"num_epochs": 2, "num_iterations_per_epoch": 2, "num_val_iterations_per_epoch": 1})
    assert trainer.label_manager.has_regions and trainer.label_manager.has_ignore_label
    trainer.run_training()  # no final validation in-process: nnUNetv2_train runs it separately
    assert len(trainer.rounds) == 1 and sorted(trainer.pseudo_labeled_cases()) == sorted(
        trainer.unlabeled_identifiers)  # 3 unlabeled, 2 epochs: all in one round at epoch 1
    log = trainer.logger.local_logger.my_fantastic_logging
    assert all(np.isfinite(log[k]).all() for k in ("loss_segmentation", "loss_regularization", "train_losses"))
    assert all(0 <= v <= 1 for v in log["pair_similarity"])
    for case in trainer.pseudo_labeled_cases():
        seg, props = trainer.store.load(case)
        assert seg.shape == (1, *_image_shape(trainer, case)[1:])
        assert set(np.unique(seg[:])) <= {-1, 0, 1, 2}  # label values, regions mapped back; never the ignore label
        # the key nnU-Net's loader uses for 'annotated' voxels on ignore-label datasets
        assert (-1, *trainer.label_manager.all_labels) in props["class_locations"]
    assert (trainer.store.folder.parent / "checkpoint_final.pth").exists()


def test_2d_configuration_across_a_round(demo, make):
    trainer = make(demo, {"num_epochs": 5, "selection_size": 1, "first_step_epochs": 1}, configuration="2d")
    patch = trainer.configuration_manager.patch_size
    assert len(patch) == 2
    trainer.unlabeled_identifiers = trainer.prepare_unlabeled_data()
    # 2d tiles are slices of the 3d image: the representation is the mean over slices and positions
    case = trainer.unlabeled_identifiers[0]
    image = torch.from_numpy(np.asarray(trainer.unlabeled_images().load_case(case)[0][:], dtype=np.float32))
    assert tuple(image.shape[2:]) == tuple(patch)  # one tile per slice
    trainer.network.eval()
    with torch.no_grad():
        expected = trainer.network.encoder(image.movedim(1, 0))[-1].mean((0, 2, 3)).numpy()
    assert np.allclose(trainer.latent_representations([], [case])[case], expected, atol=1e-5)

    # pairs of 2d patches through the loss
    trainer.network.train()
    batch = next(trainer.get_paired_training_dataloader())
    assert batch["data"].shape[2:] == tuple(patch)
    losses = trainer.compute_losses(batch["data"], batch["target"])
    assert all(torch.isfinite(v) for v in losses.values())
    # the first of 4 rounds (E1 = 1, one case per round) on 2d tiles
    trainer.dataloader_train = trainer.get_paired_training_dataloader()
    trainer.current_epoch = 1
    trainer.on_train_epoch_start()
    assert len(trainer.pseudo_labeled_cases()) == 1 and trainer.schedule.round_epochs == [1, 2, 3, 4]
    selected = trainer.pseudo_labeled_cases()[0]
    seg, _ = trainer.store.load(selected)
    assert seg.shape == (1, *trainer.unlabeled_images().load_case(selected)[0].shape[1:])
