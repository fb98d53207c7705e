"""Expected calibration error and reliability diagrams against hand-computed examples."""

import json
import pickle

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import folder_ece

from nnunet_ssl.cli import main
from nnunet_ssl.evaluation.calibration import (
    CalibrationBins,
    calibration_on_folder,
    case_calibration,
    expected_calibration_error,
    validation_calibration,
)


def test_ece_by_hand():
    # 15 bins of width 1/15; bin m holds ((m-1)/15, m/15]
    conf = [0.95, 0.95, 0.61, 0.64, 0.30, 0.10]
    correct = [1, 0, 1, 1, 0, 1]
    # bin 15: {0.95, 0.95}, acc 1/2, conf 0.95 -> 2/6 * 0.45   = 0.15
    # bin 10: {0.61, 0.64}, acc 1,   conf 0.625 -> 2/6 * 0.375 = 0.125
    # bin 5:  {0.30},       acc 0,   conf 0.30 -> 1/6 * 0.3    = 0.05
    # bin 2:  {0.10},       acc 1,   conf 0.10 -> 1/6 * 0.9    = 0.15
    assert expected_calibration_error(np.array(conf), np.array(correct)) == pytest.approx(0.475)
    bins = CalibrationBins.from_samples(np.array(conf), np.array(correct))
    assert bins.count.tolist() == [0, 1, 0, 0, 1, 0, 0, 0, 0, 2, 0, 0, 0, 0, 2]
    assert bins.accuracy()[14] == 0.5 and bins.confidence()[9] == pytest.approx(0.625)


def test_bin_edges_and_additivity():
    bins = CalibrationBins.from_samples(np.array([0.0, 1.0, 0.5]), np.array([True, True, False]))
    assert bins.count[0] == 1 and bins.count[14] == 1 and bins.count[7] == 1  # 0 -> first, 1 -> last, 0.5 -> 8th
    a = CalibrationBins.from_samples(np.array([0.9, 0.2]), np.array([1, 1]))
    b = CalibrationBins.from_samples(np.array([0.9]), np.array([0]))
    # pooled: bin 14 {0.9 ok, 0.9 wrong}: 2/3 * |0.5 - 0.9| ; bin 3 {0.2 ok}: 1/3 * 0.8
    assert (a + b).ece() == pytest.approx(2 / 3 * 0.4 + 1 / 3 * 0.8)
    assert np.isnan(CalibrationBins().ece())


def test_case_calibration_softmax_with_ignore_label():
    # 6 voxels, labels 0..2, ignore label 3
    probs = np.array([[0.9, 0.2, 0.1, 0.6, 0.3, 0.5],
                      [0.05, 0.7, 0.3, 0.3, 0.3, 0.25],
                      [0.05, 0.1, 0.6, 0.1, 0.4, 0.25]])
    ref = np.array([0, 1, 1, 0, 2, 3])
    # predictions: 0, 1, 2, 0, 2, (ignored); confidence 0.9, 0.7, 0.6, 0.6, 0.4; correct 1, 1, 0, 1, 1
    res = case_calibration(probs, ref, [1, 2], regions=False, ignore_label=3)
    # all: bin 14 {0.9 ok}, bin 11 {0.7 ok}, bin 9 {0.6 wrong, 0.6 ok}, bin 6 {0.4 ok}
    expected_all = (0.1 + 0.3 + 2 * abs(0.5 - 0.6) + 0.6) / 5
    assert res["all"].ece() == pytest.approx(expected_all)
    # foreground: reference or prediction not background: voxels 1, 2, 4
    assert res["foreground"].total == 3
    assert res["foreground"].ece() == pytest.approx((0.3 + 0.6 + 0.6) / 3)
    # class 1: voxels 1 (ref 1, pred 1) and 2 (ref 1, pred 2); class 2: voxels 2 and 4
    assert res["classes"]["1"].ece() == pytest.approx((0.3 + 0.6) / 2)
    assert res["classes"]["2"].ece() == pytest.approx((0.6 + 0.6) / 2)


def test_case_calibration_regions():
    # regions (1, 2) and 2 in channel order; sigmoid probabilities
    probs = np.array([[0.8, 0.3, 0.9, 0.1],
                      [0.2, 0.1, 0.7, 0.6]])
    ref = np.array([[1, 2, 2, 0]])  # (1, *spatial) as nnU-Net's readers return
    res = case_calibration(probs, ref, [(1, 2), 2], regions=True)
    # region (1, 2): inside = [T, F, T, F], reference [T, T, T, F]; conf 0.8, 0.7, 0.9, 0.9; correct T, F, T, T
    # its foreground: voxels 0, 1, 2 -> bins: 0.8 ok (bin 12), 0.7 wrong (bin 11), 0.9 ok (bin 14)
    r12 = (0.2 + 0.7 + 0.1) / 3
    assert res["classes"]["(1, 2)"].ece() == pytest.approx(r12)
    # region 2: inside = [F, F, T, T], reference [F, T, T, F]; conf 0.8, 0.9, 0.7, 0.6; correct T, F, T, F
    # its foreground: voxels 1, 2, 3 -> 0.9 wrong, 0.7 ok, 0.6 wrong (bins 14, 11, 9)
    r2 = (0.9 + 0.3 + 0.6) / 3
    assert res["classes"]["2"].ece() == pytest.approx(r2)
    assert res["foreground"].total == 6
    # pooled foreground: bin 14 {0.9 ok, 0.9 wrong}, 12 {0.8 ok}, 11 {0.7 wrong, 0.7 ok}, 9 {0.6 wrong}
    assert res["foreground"].ece() == pytest.approx((2 * 0.4 + 0.2 + 2 * 0.2 + 0.6) / 6)
    assert res["all"].total == 8


def _write_case(folder, ref_folder, case, probs, ref, spacing=(1.0, 1.0, 1.0)):
    np.savez_compressed(folder / f"{case}.npz", probabilities=probs.astype(np.float32))
    with open(folder / f"{case}.pkl", "wb") as f:
        pickle.dump({"spacing": list(spacing)}, f)
    img = sitk.GetImageFromArray(ref.astype(np.uint8))
    img.SetSpacing(spacing[::-1])
    sitk.WriteImage(img, str(ref_folder / f"{case}.nii.gz"))


@pytest.fixture
def prediction_folder(tmp_path):
    pred, ref = tmp_path / "pred", tmp_path / "ref"
    pred.mkdir()
    ref.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        logits = rng.normal(size=(3, 4, 5, 6)) * 3
        probs = np.exp(logits) / np.exp(logits).sum(0)
        _write_case(pred, ref, f"c{i}", probs, rng.integers(0, 3, (4, 5, 6)))
    dataset_json = {"labels": {"background": 0, "a": 1, "b": 2}, "channel_names": {"0": "x"}, "numTraining": 2,
                    "file_ending": ".nii.gz"}
    plans = {"image_reader_writer": "SimpleITKIO", "label_manager": "LabelManager", "configurations": {},
             "transpose_forward": [0, 1, 2], "transpose_backward": [0, 1, 2]}
    (pred / "dataset.json").write_text(json.dumps(dataset_json))
    (pred / "plans.json").write_text(json.dumps(plans))
    return pred, ref, dataset_json, plans


def test_folder_json_diagram_and_cli(prediction_folder, tmp_path, capsys):
    pred, ref, dataset_json, plans = prediction_folder
    result = calibration_on_folder(ref, pred, dataset_json, plans, tmp_path / "c.json", tmp_path / "d.png",
                                   num_processes=1)
    saved = json.loads((tmp_path / "c.json").read_text())
    assert saved["n_bins"] == 15 and [c["case"] for c in saved["metric_per_case"]] == ["c0", "c1"]
    fg = folder_ece(pred, ref, ["c0", "c1"], lambda r, p: (r != 0) | (p != 0))
    assert saved["pooled"]["foreground"]["ECE"] == pytest.approx(fg, rel=1e-5)
    assert saved["pooled"]["classes"]["2"]["ECE"] == pytest.approx(
        folder_ece(pred, ref, ["c0", "c1"], lambda r, p: (r == 2) | (p == 2)), rel=1e-5)
    per_case = [folder_ece(pred, ref, [c], lambda r, p: np.ones_like(r, bool)) for c in ("c0", "c1")]
    assert saved["mean"]["all"] == pytest.approx(np.mean(per_case), rel=1e-5)
    assert sum(saved["pooled"]["all"]["bins"]["count"]) == 2 * 4 * 5 * 6
    assert result == saved
    assert (tmp_path / "d.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    main(["calibration", "-ref", str(ref), "-pred", str(pred), "-np", "1"])
    out = capsys.readouterr().out
    assert "foreground" in out and f"{fg:.4f}" in out
    assert json.loads((pred / "calibration.json").read_text())["pooled"] == saved["pooled"]
    assert (pred / "reliability_diagram.png").stat().st_size > 0


def test_clear_errors(prediction_folder, tmp_path):
    pred, ref, dataset_json, plans = prediction_folder
    with pytest.raises(FileNotFoundError, match="save_probabilities"):
        calibration_on_folder(ref, tmp_path, dataset_json, plans)
    (ref / "c1.nii.gz").unlink()
    with pytest.raises(FileNotFoundError, match="no reference for c1"):
        calibration_on_folder(ref, pred, dataset_json, plans, num_processes=1)
    _write_case(pred, ref, "c1", np.full((3, 4, 5, 6), 1 / 3), np.zeros((4, 5, 7)))
    with pytest.raises(ValueError, match="not the same image geometry"):
        calibration_on_folder(ref, pred, dataset_json, plans, num_processes=1)
    with pytest.raises(SystemExit, match="dataset.json not found"):
        main(["calibration", "-ref", str(ref), "-pred", str(tmp_path)])


def test_validation_removes_only_the_probabilities_it_created(prediction_folder):
    pred, ref, dataset_json, plans = prediction_folder
    validation_calibration(pred, ref, dataset_json, plans, ["c0", "c1"], keep_probabilities=False,
                           created_probabilities=["c1"], num_processes=1)
    assert (pred / "calibration.json").is_file() and (pred / "reliability_diagram.png").is_file()
    assert (pred / "c0.npz").is_file() and not (pred / "c1.npz").exists() and not (pred / "c1.pkl").exists()
