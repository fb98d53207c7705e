"""Pseudo-labels: label maps from logits in nnU-Net's conventions, atomic storage, datasets for nnU-Net's loader,
and prediction with nnU-Net's sliding-window predictor from a live trainer."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader
from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2
from nnunetv2.utilities.label_handling.label_handling import LabelManager

from nnunet_ssl.data.loader import UnlabeledDataset
from nnunet_ssl.data.unlabeled import gather_unlabeled_cases, preprocess_unlabeled
from nnunet_ssl.training.pseudo_labels import (
    CombinedDataset,
    PseudoLabeledDataset,
    PseudoLabelStore,
    inference_mode,
    label_share_bias,
    label_shares,
    make_predictor,
    predict_logits,
    predict_logits_mirrored,
    predict_pseudo_labels,
    predict_pseudo_labels_with_agreement,
    segmentation_dice,
    segmentation_from_logits,
    sliding_window_tiles,
    underrepresented_labels,
)
from nnunet_ssl.training.supervised import SupervisedTrainer

LABELS = LabelManager({"background": 0, "organ": 1, "lesion": 2}, regions_class_order=None)
REGIONS = LabelManager({"background": 0, "organ": [1, 2], "lesion": 2}, regions_class_order=[1, 2])


def test_segmentation_from_logits_softmax_and_regions():
    logits = torch.zeros(3, 2, 2, 2)
    logits[1, 0] = 5  # first row: organ
    logits[2, 1, 1] = 5  # one voxel column: lesion
    nonzero = np.zeros((1, 2, 2, 2), np.int8)
    nonzero[0, 1, 0, 0] = -1  # outside the nonzero mask
    seg = segmentation_from_logits(logits, LABELS, nonzero)
    expected = np.zeros((1, 2, 2, 2), np.int8)
    expected[0, 0] = 1
    expected[0, 1, 1] = 2
    expected[0, 1, 0, 0] = -1
    assert seg.dtype == np.int8 and np.array_equal(seg, expected)

    region_logits = torch.full((2, 2, 2, 2), -5.0)
    region_logits[0, 0] = 5  # organ region only -> label 1
    region_logits[:, 1, 1] = 5  # organ and lesion regions -> label 2 (regions_class_order: later wins)
    seg = segmentation_from_logits(region_logits, REGIONS)
    expected = np.zeros((1, 2, 2, 2), np.int8)
    expected[0, 0] = 1
    expected[0, 1, 1] = 2
    assert np.array_equal(seg, expected)


def test_store_writes_atomically_with_class_locations(tmp_path):
    store = PseudoLabelStore(tmp_path / "pl")
    seg = np.zeros((1, 8, 8, 8), np.int8)
    seg[0, 2:4, 2:4, 2:4] = 1
    seg[0, 5, 5, 5] = 2
    store.write("case_a", seg, {"spacing": [1, 1, 1]}, LABELS)
    assert store.cases() == ["case_a"] and store.has("case_a")
    assert sorted(p.name for p in (tmp_path / "pl").iterdir()) == ["case_a.pkl", "case_a_seg.b2nd"]  # no tmp left
    loaded, props = store.load("case_a")
    assert np.array_equal(loaded[:], seg) and props["spacing"] == [1, 1, 1]
    locs = props["class_locations"]
    assert {tuple(c[1:]) for c in locs[2]} == {(5, 5, 5)}  # (channel, z, y, x) as nnU-Net stores them
    assert all(seg[0, z, y, x] == 1 for _, z, y, x in locs[1])
    # overwriting a case replaces it; a seg without its .pkl (interrupted write) does not count as stored
    store.write("case_a", np.zeros_like(seg), {}, LABELS)
    assert store.load("case_a")[0][:].max() == 0
    store.properties_file("case_a").unlink()
    assert store.cases() == [] and not store.has("case_a")


@pytest.fixture
def trainer(demo, monkeypatch):
    for k, v in demo.vars.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("nnUNet_ssl_hparams", raising=False)
    plans = {**json.loads((demo.pp / "nnUNetPlans.json").read_text()), "continue_training": False}
    dataset_json = json.loads((demo.pp / "dataset.json").read_text())
    t = SupervisedTrainer(plans, "3d_fullres", 0, dataset_json, torch.device("cpu"))
    t.initialize()
    return t


def test_predict_with_nnunet_predictor_and_load_through_nnunet_loader(demo, trainer, tmp_path):
    cases = gather_unlabeled_cases(demo.raw, json.loads((demo.raw / "dataset.json").read_text()))
    image_folder = tmp_path / "unlabeled"
    preprocess_unlabeled(cases, image_folder, trainer.plans_manager, "3d_fullres", trainer.dataset_json, 1,
                         progress=False)
    images = UnlabeledDataset(str(image_folder), sorted(cases))
    store = PseudoLabelStore(tmp_path / "pseudo")
    trainer.network.train()
    predict_pseudo_labels(trainer, images, sorted(cases), store)
    assert trainer.network.training and trainer.network.decoder.deep_supervision  # restored afterwards
    assert store.cases() == sorted(cases)
    for case in cases:
        data, nonzero, _, _ = images.load_case(case)
        seg, props = store.load(case)
        assert seg.shape == (1, *data.shape[1:])  # the preprocessed image's shape
        assert set(np.unique(seg[:])) <= {-1, 0, 1, 2}
        assert np.array_equal(seg[:] < 0, nonzero[:] < 0)
        assert set(props["class_locations"]) == {1, 2}

    # the stored map is the argmax of nnU-Net's sliding-window logits inside the nonzero mask, -1 outside
    case = min(cases)
    data, nonzero, _, _ = images.load_case(case)
    with inference_mode(trainer) as net:
        logits = predict_logits(make_predictor(trainer, net), data)
    expected = np.where(nonzero[0][:] < 0, -1, logits.argmax(0).numpy())
    assert np.array_equal(store.load(case)[0][0][:], expected)

    # nnU-Net's loader reads labeled and pseudo-labeled cases together, with foreground oversampling
    labeled = nnUNetDatasetBlosc2(trainer.preprocessed_dataset_folder, trainer.do_split()[0])
    combined = CombinedDataset([labeled, PseudoLabeledDataset(image_folder, store, sorted(cases))])
    assert combined.identifiers == sorted(labeled.identifiers + sorted(cases))
    patch = trainer.configuration_manager.patch_size
    loader = nnUNetDataLoader(combined, 4, patch, patch, trainer.label_manager, oversample_foreground_percent=1.0)
    batch = next(loader)
    assert batch["data"].shape == (4, 1, *patch) and batch["target"].shape == (4, 1, *patch)
    with pytest.raises(ValueError, match="in more than one dataset"):
        CombinedDataset([labeled, labeled])


class _Recorder(torch.nn.Module):
    """Stands in for the network: records every input and returns zero logits of the right shape."""

    def __init__(self, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.inputs: list[torch.Tensor] = []

    def forward(self, x):
        self.inputs.append(x.clone())
        return torch.zeros((x.shape[0], self.num_heads, *x.shape[2:]))


@pytest.mark.parametrize("shape", [(1, 40, 30, 50), (1, 10, 12, 9)])  # several tiles; smaller than the patch
def test_sliding_window_tiles_are_the_predictors_tiles(trainer, shape):
    image = torch.randn(shape)
    recorder = _Recorder(trainer.label_manager.num_segmentation_heads)
    predictor = make_predictor(trainer, recorder)
    predictor.predict_sliding_window_return_logits(image)
    fed = torch.cat(recorder.inputs)
    for batch_size in (1, 3):
        tiles = list(sliding_window_tiles(predictor, image, batch_size))
        assert all(t.shape[0] <= batch_size for t in tiles)
        assert torch.equal(torch.cat(tiles), fed)  # same tiles, same order, same padding
    assert fed.shape[2:] == tuple(trainer.configuration_manager.patch_size)


def test_label_shares_by_hand():
    # 8 voxels inside the mask over two maps (-1 outside), label 3 ignored: label 1 3 of 6, label 2 1 of 6
    a = np.array([[0, 1, 1, -1, 3]])
    b = np.array([[[0, 2], [1, 3]]])
    assert label_shares([a, b], [1, 2], ignore_label=3) == pytest.approx({1: 3 / 6, 2: 1 / 6})
    # without an ignore label 3 is annotated background: 1 3 of 8
    assert label_shares([a, b], [1, 2]) == pytest.approx({1: 3 / 8, 2: 1 / 8})
    assert label_shares([np.full((2, 2), -1)], [1, 2]) == {1: 0.0, 2: 0.0}  # nothing annotated
    # label 2: 0.05 against 0.2 -> under half; label 1: 0.3 against 0.4 -> not; label 3 absent from the reference
    assert underrepresented_labels({1: 0.4, 2: 0.2, 3: 0.0}, {1: 0.3, 2: 0.05, 3: 0.0}) == [2]
    assert underrepresented_labels({1: 0.4}, {}) == [1]


def test_label_share_bias_by_hand():
    # 10 voxels: background wins 2 of them by far; of the 8 foreground ones label 1 wins 6 (margins 1 to 6 over
    # label 2) and label 2 wins 2
    margin = torch.tensor([1.0, 2, 3, 4, 5, 6, -1, -2])
    logits = torch.zeros(3, 10)
    logits[0, 8:] = 100.0
    logits[1, :8] = margin
    logits[0, :8] = -100.0
    bias = label_share_bias(logits, {1: 0.3, 2: 0.3})  # renormalised: half of the foreground each
    seg = (logits + bias[:, None]).argmax(0)
    assert bias[0] == 0 and bias[1] + bias[2] == pytest.approx(0, abs=1e-6)
    # label 2 takes the voxels where label 1 led by the least (margins 1 and 2): its offset over label 1's is
    # above 2 and below 3 (it would take margin 3 too)
    assert (seg[8:] == 0).all() and (seg[:8] == 1).sum() == 4 and (seg[[0, 1, 6, 7]] == 2).all()
    assert 2 < float(bias[2] - bias[1]) < 3
    # a label the labeled cases lack keeps offset 0 (it is neither suppressed nor aligned)
    three = torch.cat([logits, torch.full((1, 10), -5.0)])
    assert label_share_bias(three, {1: 0.5, 2: 0.5, 3: 0.0})[3] == 0
    # one foreground label, or no foreground voxel, or no foreground inside the mask: nothing to align
    assert not label_share_bias(logits, {1: 0.5, 2: 0.0}).any()
    assert not label_share_bias(logits[:, 8:], {1: 0.5, 2: 0.5}).any()
    assert not label_share_bias(logits, {1: 0.5, 2: 0.5}, mask=np.arange(10) >= 8).any()
    # the mask decides what counts: voxels 0 to 3 only, where label 1 leads 3 to 1 -> shares 1/4 and 3/4 wanted
    masked = label_share_bias(logits, {1: 0.25, 2: 0.75}, mask=np.arange(10) < 4)
    assert ((logits + masked[:, None]).argmax(0)[:4] == 2).sum() == 3
    # 2d logits (C, x, y) are flattened; shares reached within the tolerance
    rng = torch.Generator().manual_seed(0)
    image = torch.randn(3, 40, 50, generator=rng)
    seg = (image + label_share_bias(image, {1: 0.8, 2: 0.2})[:, None, None]).argmax(0)
    assert float((seg == 1).sum() / (seg > 0).sum()) == pytest.approx(0.8, rel=0.02)


def test_segmentation_dice_by_hand():
    a = np.array([[0, 1, 1, 2, -1]])
    b = np.array([[0, 1, 0, 2, 2]])
    # label 1: |a| = 2, |b| = 1, overlap 1 -> 2/3; label 2: the last voxel is outside a's mask -> 1 vs 1 -> 1
    assert segmentation_dice(a, b, LABELS) == pytest.approx((2 / 3 + 1) / 2)
    # regions: organ {1, 2}: |a| = 3, |b| = 2, overlap 2 -> 0.8; lesion {2}: 1
    assert segmentation_dice(a, b, REGIONS) == pytest.approx((0.8 + 1) / 2)
    # a label absent from both maps is left out; nothing anywhere -> the maps agree
    assert segmentation_dice(np.array([[0, 1]]), np.array([[0, 1]]), LABELS) == 1.0
    assert segmentation_dice(np.zeros((1, 3)), np.zeros((1, 3)), LABELS) == 1.0
    assert segmentation_dice(np.array([[1, 0]]), np.array([[0, 1]]), LABELS) == 0.0


def test_agreement_of_plain_and_mirrored_predictions(demo, trainer, tmp_path):
    cases = sorted(gather_unlabeled_cases(demo.raw, json.loads((demo.raw / "dataset.json").read_text())))[:2]
    image_folder = tmp_path / "unlabeled"
    preprocess_unlabeled({c: gather_unlabeled_cases(demo.raw, trainer.dataset_json)[c] for c in cases}, image_folder,
                         trainer.plans_manager, "3d_fullres", trainer.dataset_json, 1, progress=False)
    images = UnlabeledDataset(str(image_folder), cases)
    trainer.configure_rotation_dummyDA_mirroring_and_inital_patch_size()  # sets the inference mirroring axes
    axes = trainer.inference_allowed_mirroring_axes
    assert axes == (0, 1, 2)
    store = PseudoLabelStore(tmp_path / "pseudo")
    agreement = predict_pseudo_labels_with_agreement(trainer, images, cases, store)
    assert sorted(agreement) == cases and store.cases() == cases
    lm = trainer.label_manager
    for case in cases:
        data, nonzero, _, _ = images.load_case(case)
        with inference_mode(trainer) as net:
            predictor = make_predictor(trainer, net)
            plain = segmentation_from_logits(predict_logits(predictor, data), lm, nonzero)
            flipped = predict_logits(predictor, np.flip(data[:], (1, 2, 3)).copy()).flip((1, 2, 3))
            mirrored = predict_logits_mirrored(predictor, data, axes)
        assert torch.allclose(mirrored, flipped)  # the image mirrored along (z, y, x), the logits mirrored back
        assert np.array_equal(store.load(case)[0][:], plain)  # the stored pseudo-label is the plain prediction
        assert agreement[case] == pytest.approx(segmentation_dice(plain, segmentation_from_logits(mirrored, lm,
                                                                                                  nonzero), lm))
        assert 0.0 <= agreement[case] <= 1.0


def test_pseudo_label_quality_example_by_hand(tmp_path, capsys):
    """examples/pseudo_label_quality.py: per round, each label's share in the pseudo-labels and the references and
    the Dice of the round's cases together; a case without a reference stops with its name."""
    import blosc2
    import pseudo_label_quality

    fold, ref = tmp_path / "fold_0", tmp_path / "reference"
    (fold / "popcorn_pseudo_labels").mkdir(parents=True)
    ref.mkdir()
    maps = {"u_0": (np.array([[0, 1, 1, 2, -1]]), np.array([[0, 1, 0, 2, -1]])),  # (pseudo-label, reference)
            "u_1": (np.array([[1, 0, 0, 0, 0]]), np.array([[1, 2, 2, 0, 0]]))}
    for case, (pseudo, reference) in maps.items():
        blosc2.asarray(pseudo, urlpath=str(fold / "popcorn_pseudo_labels" / f"{case}_seg.b2nd"), mode="w")
        blosc2.asarray(reference, urlpath=str(ref / f"{case}_seg.b2nd"), mode="w")
    state = {"rounds": [{"round": 1, "epoch": 3, "selected": [{"case": "u_0"}]},
                        {"round": 2, "epoch": 5, "selected": [{"case": "u_1"}]}]}
    (fold / "popcorn_state.json").write_text(json.dumps(state))
    pseudo_label_quality.main(fold, ref)
    lines = capsys.readouterr().out.splitlines()
    # u_0: 4 annotated voxels; label 1 pseudo 2 of 4, reference 1 of 4, overlap 1 -> Dice 2/3; label 2 1 of 4 both
    assert lines[1] == "round 1 (epoch 3) | 1 | 0.500 / 0.250 | 0.667 | 0.250 / 0.250 | 1.000"
    # u_1: label 1 1 of 5 in both (Dice 1); label 2 absent from the pseudo-label, 2 of 5 in the reference -> Dice 0
    assert lines[2] == "round 2 (epoch 5) | 1 | 0.200 / 0.200 | 1.000 | 0.000 / 0.400 | 0.000"
    # all rounds, both cases in group 'u': label 1 pseudo 3 of 9, reference 2 of 9, overlap 2 -> Dice 4/5; label 2
    # pseudo 1 of 9, reference 3 of 9, overlap 1 -> Dice 2/4
    assert lines[3:] == ["all rounds, u | 2 | 0.333 / 0.222 | 0.800 | 0.111 / 0.333 | 0.500"]
    (ref / "u_1_seg.b2nd").unlink()
    with pytest.raises(SystemExit, match=r"no reference label map for \['u_1'\]"):
        pseudo_label_quality.main(fold, ref)
