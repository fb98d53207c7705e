"""The benchmark harness: bad input before training, labeled-case choice, aggregation, and (slow) a whole run on the
tiny demo dataset that is resumed without repeating finished runs."""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from conftest import SHORT

from nnunet_ssl.data.labeled_fraction import make_labeled_fraction
from nnunet_ssl.evaluation import benchmark as bm
from nnunet_ssl.evaluation import report
from nnunet_ssl.training.hparams import resolve_hparams


def _settings(tmp_path, **kw) -> bm.Settings:
    base = {"dataset": "971", "work_dir": tmp_path / "work", "configuration": "3d_fullres", "device": "cpu",
            "seeds": [0], "num_labeled": [2], "trainers": ["MuSTTrainer"], "hparams": dict(SHORT),
            "disable_tta": True}
    base.update(kw)
    return bm.Settings(**base)


def _raw_dataset(root: Path, n_train=5, labels=True, test=True) -> Path:
    folder = root / "raw" / "Dataset971_Tiny"
    for sub in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
        (folder / sub).mkdir(parents=True)
    img = sitk.GetImageFromArray(np.zeros((4, 4, 4), np.float32))
    for i in range(n_train):
        sitk.WriteImage(img, str(folder / "imagesTr" / f"c{i}_0000.nii.gz"))
        if labels:
            sitk.WriteImage(img, str(folder / "labelsTr" / f"c{i}.nii.gz"))
    if test:
        sitk.WriteImage(img, str(folder / "imagesTs" / "t0_0000.nii.gz"))
        sitk.WriteImage(img, str(folder / "labelsTs" / "t0.nii.gz"))
    (folder / "dataset.json").write_text(json.dumps({"channel_names": {"0": "T1"}, "labels": {"background": 0,
                                                    "a": 1}, "numTraining": n_train, "file_ending": ".nii.gz"}))
    return folder


@pytest.fixture
def raw_env(tmp_path, monkeypatch):
    monkeypatch.setenv("nnUNet_raw", str(tmp_path / "raw"))
    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path / "pp"))
    monkeypatch.setenv("nnUNet_results", str(tmp_path / "results"))
    return tmp_path


def test_dataset_without_labels(raw_env):
    _raw_dataset(raw_env, labels=False)
    with pytest.raises(bm.BenchmarkError, match="needs a label in labelsTr"):
        bm.prepare(_settings(raw_env), log=lambda _: None)


def test_dataset_without_test_labels(raw_env):
    folder = _raw_dataset(raw_env)
    (folder / "labelsTs" / "t0.nii.gz").unlink()
    with pytest.raises(bm.BenchmarkError, match="labelsTs"):
        bm.prepare(_settings(raw_env), log=lambda _: None)


def test_labeled_count_too_large(raw_env):
    _raw_dataset(raw_env)  # 5 cases: nnU-Net's fold 0 keeps 4 for training, so at most 3 can be labeled
    with pytest.raises(bm.BenchmarkError, match=r"labeled count 4 does not fit the labeled pool of 4.*1 to 3"):
        bm.prepare(_settings(raw_env, num_labeled=[4]), log=lambda _: None)
    with pytest.raises(bm.BenchmarkError, match="labeled count 0"):
        bm.prepare(_settings(raw_env, num_labeled=[0]), log=lambda _: None)
    assert not (raw_env / "pp").exists()  # nothing planned, nothing trained


def test_unknown_trainer_and_bad_hparams(raw_env):
    _raw_dataset(raw_env)
    with pytest.raises(bm.BenchmarkError, match="unknown trainer.*NoSuchTrainer.*MuSTTrainer"):
        bm.prepare(_settings(raw_env, trainers=["NoSuchTrainer"]), log=lambda _: None)
    with pytest.raises(bm.BenchmarkError, match="num_epochs"):
        bm.prepare(_settings(raw_env, hparams={"num_epochs": 0}), log=lambda _: None)
    with pytest.raises(bm.BenchmarkError, match="temperature"):
        bm.prepare(_settings(raw_env, trainer_hparams={"MuSTTrainer": {"temperature": -1}}), log=lambda _: None)
    with pytest.raises(bm.BenchmarkError, match="--augmentation-workers -1"):
        bm.prepare(_settings(raw_env, augmentation_workers=-1), log=lambda _: None)
    with pytest.raises(bm.BenchmarkError, match="--prediction-workers -2: give 0 or more"):
        bm.prepare(_settings(raw_env, prediction_workers=-2), log=lambda _: None)
    with pytest.raises(bm.BenchmarkError, match="--feature-scale 0: give a number above 0"):
        bm.prepare(_settings(raw_env, feature_scale=0), log=lambda _: None)


def test_training_seeded_with_the_run_seed(raw_env):
    settings = _settings(raw_env, trainer_hparams={"MuSTTrainer": {"temperature": 0.5}})
    # the test set is predicted unmirrored (--disable-tta), and so is the final validation
    unmirrored = {"final_validation_mirroring": False}
    assert bm.hparams_for(settings, "MuSTTrainer", 4) == {**SHORT, **unmirrored, "temperature": 0.5, "seed": 4}
    assert bm.hparams_for(settings, "SupervisedTrainer", 4) == {**SHORT, **unmirrored, "seed": 4}
    assert "seed" not in bm.hparams_for(dataclasses.replace(settings, seed_training=False), "MuSTTrainer", 4)
    assert bm.hparams_for(dataclasses.replace(settings, disable_tta=False), "SupervisedTrainer", 4) == \
        {**SHORT, "seed": 4}
    _raw_dataset(raw_env)
    for bad in ({"hparams": {**SHORT, "seed": 1}}, {"trainer_hparams": {"MuSTTrainer": {"seed": 1}}}):
        with pytest.raises(bm.BenchmarkError, match="'seed' in --(trainer-)?hparams.*--no-seed-training"):
            bm.prepare(_settings(raw_env, **bad), log=lambda _: None)


def test_work_folder_from_before_seeding_resumes_unseeded(tmp_path):
    """A work folder whose benchmark.json predates the ``seed_training`` setting holds unseeded runs: it resumes with
    --no-seed-training and is refused with seeding (its runs would not be comparable)."""
    ctx = bm.Context(971, "Dataset971_Tiny", tmp_path, tmp_path, "nnUNetPlans", ["c0", "c1"], ["c2"], ["c0", "c1"],
                     ["t0"], False, {"1": "a"})
    unseeded = _settings(tmp_path, seed_training=False)
    old = {k: v for k, v in unseeded.fingerprint().items() if k != "seed_training"}
    unseeded.work_dir.mkdir(parents=True)
    (unseeded.work_dir / "benchmark.json").write_text(json.dumps({**old, "dataset": ctx.name, "val": ctx.val,
                                                                  "pool": ctx.pool}))
    with pytest.raises(bm.BenchmarkError, match=r"other settings \(seed_training differ"):
        bm._check_work_dir(_settings(tmp_path), ctx)
    bm._check_work_dir(unseeded, ctx)
    assert json.loads((unseeded.work_dir / "benchmark.json").read_text())["seed_training"] is False


def test_finished_training_with_other_hparams_is_refused_before_anything_runs(tmp_path):
    """A fold whose training finished but was not evaluated is only predicted on resume: one trained with other
    hyper-parameters (here a value left at its default then and set now, and the reverse) is refused, naming it."""
    ctx = bm.Context(971, "Dataset971_Tiny", tmp_path, tmp_path, "nnUNetPlans", ["c0", "c1"], ["c2"], ["c0", "c1"],
                     ["t0"], False, {"1": "a"})
    settings = _settings(tmp_path, trainers=["POPCORNTrainer"])
    run = bm.Run(bm.SSL, "POPCORNTrainer", 2, 0)
    fold = bm.fold_folder(settings, ctx, settings.work_dir / "runs" / run.env_name, run)
    fold.mkdir(parents=True)
    spec = bm.trainer_classes()["POPCORNTrainer"].hparam_spec
    in_force = resolve_hparams(spec, "POPCORNTrainer", bm.hparams_for(settings, "POPCORNTrainer", 0))
    torch.save({"nnunet_ssl": {"hparams": in_force}}, fold / "checkpoint_final.pth")
    bm._check_finished_trainings(settings, ctx, [run])  # the same hyper-parameters: predicted on resume
    asked_other = dataclasses.replace(settings, trainer_hparams={"POPCORNTrainer": {"first_step_epochs": 3}})
    with pytest.raises(bm.BenchmarkError, match=r"fold_0 holds a finished training of POPCORNTrainer made with "
                                                r"other hyper-parameters \(first_step_epochs: None there, 3 now\); "
                                                r"delete that fold_0 folder"):
        bm._check_finished_trainings(asked_other, ctx, [run])
    torch.save({"nnunet_ssl": {"hparams": {**in_force, "first_step_epochs": 3}}}, fold / "checkpoint_final.pth")
    with pytest.raises(bm.BenchmarkError, match=r"first_step_epochs: 3 there, None now"):
        bm._check_finished_trainings(settings, ctx, [run])
    bm._check_finished_trainings(asked_other, ctx, [run])
    bm.metrics_file(settings, run).write_text("{}")  # evaluated already: never read again, so not checked
    bm._check_finished_trainings(settings, ctx, [run])


def test_process_count_read_from_the_environment_when_the_settings_are_made(tmp_path, monkeypatch):
    monkeypatch.setenv("nnUNet_def_n_proc", "5")
    assert _settings(tmp_path).num_processes == 5 and _settings(tmp_path).prediction_processes == 5
    monkeypatch.delenv("nnUNet_def_n_proc")
    assert _settings(tmp_path).num_processes == 2
    parser = argparse.ArgumentParser()
    bm.add_arguments(parser)
    for argv, expected in ((["--device", "cpu"], 2), (["--device", "cpu", "-np", "3"], 3)):
        args = parser.parse_args(["-d", "971", "--work-dir", str(tmp_path), *argv])
        assert bm.settings_from_args(args).num_processes == expected


def test_cli_reports_bad_input(raw_env):
    _raw_dataset(raw_env, labels=False)
    env = {**os.environ, "nnUNet_raw": str(raw_env / "raw"), "nnUNet_preprocessed": str(raw_env / "pp")}
    proc = subprocess.run([str(Path(sys.executable).parent / "nnunet_ssl"), "benchmark", "-d", "971", "--work-dir",
                           str(raw_env / "w"), "--num-labeled", "2", "--device", "cpu"], env=env,
                          capture_output=True, text=True, check=False)
    assert proc.returncode != 0 and "error:" in proc.stderr and "labelsTr" in proc.stderr


def test_same_labeled_cases_as_labeled_fraction_command(tmp_path):
    cases = [f"case_{i:03d}" for i in range(12)]
    (tmp_path / "splits_final.json").write_text(json.dumps([{"train": cases[:10], "val": cases[10:]}]))
    for seed in (0, 3):
        declared = make_labeled_fraction(tmp_path, cases, num_labeled=3, seed=seed, folds=[0])["0"]
        assert bm._choose_labeled(cases[:10], 3, seed) == sorted(set(cases[:10]) - set(declared))


def test_placebo_runs_after_their_trainer_with_the_unsupervised_weights_at_0(tmp_path):
    trainers = ["MuSTTrainer", "POPCORNTrainer", "UGMCLTrainer"]
    settings = _settings(tmp_path, placebo=True, seeds=[0, 1], trainers=trainers,
                         trainer_hparams={"MuSTTrainer": {"consistency_weight": 5.0, "temperature": 0.5}})
    logged = []
    runs = bm.plan_runs(settings, trainers, [2], logged.append)
    assert [(r.role, r.trainer, r.seed) for r in runs if r.role in (bm.SSL, bm.PLACEBO) and r.seed == 1] == [
        (bm.SSL, "MuSTTrainer", 1), (bm.PLACEBO, "MuSTTrainer", 1), (bm.SSL, "POPCORNTrainer", 1),
        (bm.SSL, "UGMCLTrainer", 1), (bm.PLACEBO, "UGMCLTrainer", 1)]
    assert len(runs) == 2 * 2 + 2 * 5 and [r.role for r in runs[:4]] == [bm.LOWER, bm.UPPER] * 2
    assert logged == [("no placebo for POPCORNTrainer: its unlabeled images enter through no weighted loss (e.g. "
                       "as pseudo-labeled training cases); it runs without one")]
    assert bm.plan_runs(dataclasses.replace(settings, placebo=False), trainers, [2], logged.append) == \
        [r for r in runs if r.role != bm.PLACEBO] and len(logged) == 1
    placebo = next(r for r in runs if r.role == bm.PLACEBO)
    assert (placebo.name, placebo.method) == ("placebo_MuSTTrainer", "MuSTTrainer (placebo)")
    # the same trainer class: its checkpoints and predictions must not meet the trainer's
    ctx = bm.Context(971, "Dataset971_Tiny", tmp_path, tmp_path, "nnUNetPlans", [], [], [], [], False, {})
    root = tmp_path / "runs" / placebo.env_name
    trained = bm.Run(bm.SSL, "MuSTTrainer", 2, 0)
    assert bm.fold_folder(settings, ctx, root, placebo) == \
        root / "nnUNet_results_placebo" / "Dataset971_Tiny" / "MuSTTrainer__nnUNetPlans__3d_fullres" / "fold_0"
    assert bm.fold_folder(settings, ctx, root, trained).parents[2] == root / "nnUNet_results"
    assert bm._env(root, {}, None, placebo.results_folder)["nnUNet_results"] == str(root / "nnUNet_results_placebo")
    assert bm.metrics_file(settings, placebo) != bm.metrics_file(settings, trained)
    # the user's values, then the placebo's zeros over them
    unmirrored = {"final_validation_mirroring": False}
    assert bm.hparams_for(settings, "MuSTTrainer", 3, placebo=True) == {
        **unmirrored, **SHORT, "consistency_weight": 0.0, "temperature": 0.5, "seed": 3}
    assert bm.hparams_for(settings, "UGMCLTrainer", 3, placebo=True) == {
        **unmirrored, **SHORT, "consistency_weight": 0.0, "cross_task_weight": 0.0, "seed": 3}
    assert bm.hparams_for(settings, "MuSTTrainer", 3)["consistency_weight"] == 5.0


def test_gain_over_the_placebo_paired_by_seed():
    results = [_result(bm.LOWER, "SupervisedTrainer", 2, s, (0.6, 0.6), 4.0) for s in (0, 1, 2)] + \
              [_result(bm.UPPER, "SupervisedTrainer", None, s, (0.8, 0.8), 1.0) for s in (0, 1, 2)] + \
              [_result(bm.SSL, "MeanTeacherTrainer", 2, s, (d, d), 3.0) for s, d in ((0, 0.66), (1, 0.64), (2, 0.62))] + \
              [_result(bm.PLACEBO, "MeanTeacherTrainer", 2, s, (d, d), 3.0) for s, d in ((0, 0.65), (1, 0.65))] + \
              [_result(bm.SSL, "MuSTTrainer", 2, s, (0.7, 0.7), 3.0) for s in (0, 1, 2)]
    summary = report.summarise(results, {"1": "gm", "2": "wm"})
    assert [r["method"] for r in summary] == [
        "lower bound (SupervisedTrainer)", "MeanTeacherTrainer", "MeanTeacherTrainer (placebo)", "MuSTTrainer",
        "upper bound (SupervisedTrainer)"]
    lines = report.gap_lines(summary)
    # MeanTeacher +4 points over the lower bound (20% of the 20-point gap); its placebo +5, over seeds 0 and 1;
    # MeanTeacher over its placebo, seeds 0 and 1: +1 and -1 -> 0 (t(0.975, 1) 12.706 x standard error 1 point)
    # MeanTeacher: gains 6, 4, 2 points, standard error 1.155, t(0.975, 2 dof) 4.303 -> 4 -+ 4.97
    assert lines[1] == ("  - MeanTeacherTrainer: +4.0 Dice points over the lower bound (95% confidence interval -1.0 "
                        "to +9.0), 20% of the gap closed; above it in 3 of 3 seed(s) (seeds 0, 1, 2: +6.0, +4.0, +2.0).")
    assert lines[2] == ("    - over its placebo: +0.0 Dice points over the placebo (95% confidence interval -12.7 to "
                        "+12.7); above it in 1 of 2 seed(s) (seeds 0, 1: +1.0, -1.0).")
    # the same gain in both seeds: an interval of width 0, not NaN
    assert lines[3] == ("  - MeanTeacherTrainer (placebo): +5.0 Dice points over the lower bound (95% confidence "
                        "interval +5.0 to +5.0), 25% of the gap closed; above it in 2 of 2 seed(s) (seeds 0, 1: +5.0, "
                        "+5.0).")
    assert lines[4].startswith("  - MuSTTrainer: +10.0") and len(lines) == 5  # no placebo: no line about one


def _result(role, trainer, k, seed, dice, hd):
    return {"role": role, "trainer": trainer, "method": bm.Run(role, trainer, k, seed).method,
            "num_labeled": k, "seed": seed,
            "cases": [{"case": "t0", "class": "1", "Dice": dice[0], "HD95": hd, "ASD": 1.0, "ECE": None},
                      {"case": "t0", "class": "2", "Dice": dice[1], "HD95": hd, "ASD": 1.0, "ECE": None},
                      {"case": "t1", "class": "1", "Dice": float("nan"), "HD95": float("nan"), "ASD": 1.0,
                       "ECE": None}],
            "training": {"seconds_per_iteration": 0.5, "peak_rss_mib": 100.0, "peak_cuda_mib": None}}


def test_summary_table_and_gap():
    results = [_result(bm.LOWER, "SupervisedTrainer", 2, 0, (0.5, 0.7), 4.0),
               _result(bm.LOWER, "SupervisedTrainer", 2, 1, (0.6, 0.6), 6.0),
               _result(bm.SSL, "MuSTTrainer", 2, 0, (0.7, 0.7), 3.0),
               _result(bm.SSL, "MuSTTrainer", 2, 1, (0.7, 0.9), 3.0),
               _result(bm.UPPER, "SupervisedTrainer", None, 0, (0.9, 0.9), 1.0),
               _result(bm.UPPER, "SupervisedTrainer", None, 1, (0.8, 1.0), 1.0)]
    summary = report.summarise(results, {"1": "gm", "2": "wm"})
    assert [r["method"] for r in summary] == ["lower bound (SupervisedTrainer)", "MuSTTrainer",
                                              "upper bound (SupervisedTrainer)"]
    lower = summary[0]
    # per seed the test-set mean skips the NaN of case t1: seed 0 gm 0.5, seed 1 gm 0.6 -> 0.55 +- 0.0707
    assert lower["Dice gm"] == pytest.approx(0.55) and lower["Dice gm std"] == pytest.approx(np.std([0.5, 0.6],
                                                                                                       ddof=1))
    assert lower["Dice mean"] == pytest.approx(np.mean([0.6, 0.6]))  # seed means over both classes: 0.6, 0.6
    assert lower["HD95 wm"] == pytest.approx(5.0)
    table = report.markdown_table(summary, {"1": "gm", "2": "wm"})
    assert "| lower bound (SupervisedTrainer) | 2 | 2 | 0.550 ± 0.071 |" in table
    assert "| upper bound (SupervisedTrainer) | all | 2 |" in table and "ECE" not in table  # no probabilities
    # the ECE is the case's foreground ECE, repeated in every class row: one column, not one per class
    with_ece = [{**r, "cases": [{**c, "ECE": 0.1 * (1 + r["seed"])} for c in r["cases"]]} for r in results]
    head = report.markdown_table(report.summarise(with_ece, {"1": "gm", "2": "wm"}), {"1": "gm", "2": "wm"}).split("\n")
    assert head[0].count("ECE") == 1 and "| ECE foreground | s/iteration |" in head[0]
    assert head[2].endswith("| 0.150 ± 0.071 | 0.500 | 100 |")
    gap = "\n".join(report.gap_lines(summary))
    # upper 0.9, lower 0.6: 30 points; MuST 0.75: +15 points, half the gap
    assert "30.0 Dice points" in gap and "MuSTTrainer: +15.0 Dice points" in gap and "50% of the gap" in gap
    assert "above it in 2 of 2 seed(s) (seeds 0, 1: +10.0, +20.0)" in gap
    # gains 10 and 20 points: sd 7.07, standard error 5, t(0.975, 1 dof) = 12.706 -> 15 -+ 63.5
    assert "+15.0 Dice points over the lower bound (95% confidence interval -48.5 to +78.5), 50% of the gap" in gap


def test_gap_warning_names_the_count_and_the_unrounded_gap():
    def row(role, k, dice):
        return {"role": role, "num_labeled": k, "Dice mean": dice}
    upper = row(bm.UPPER, None, 0.731)
    # 0.731 - 0.6312 = 9.98 points: under the aim, though "10.0" to one decimal
    warning = report.gap_warning([row(bm.LOWER, 3, 0.6312), row(bm.LOWER, 1, 0.55), upper])
    assert warning.startswith("warning: the upper bound beats the lower bound by less than 10 Dice points")
    assert "(9.98 points with 3 labeled)" in warning and "1 labeled" not in warning  # 18.1 points: not named
    assert report.gap_warning([row(bm.LOWER, 3, 0.631), upper]) is None  # exactly 10 points
    assert report.gap_warning([row(bm.LOWER, 3, 0.6312)]) is None  # no upper bound: nothing to compare
    assert "30.00 points with 2 labeled" in report.gap_warning([row(bm.LOWER, 2, 0.5), row(bm.UPPER, None, 0.8)],
                                                               aim=0.5)


def test_gain_interval_is_students_t_over_the_seeds():
    # mean 0.01, sd 0.03, standard error 0.03 / sqrt(3) = 0.01732; t(0.975, 2 dof) = 4.3027 -> half-width 0.07452
    low, high = report.gain_interval([0.01, -0.02, 0.04])
    assert low == pytest.approx(0.01 - 0.074524, abs=1e-5) and high == pytest.approx(0.01 + 0.074524, abs=1e-5)
    assert report.gain_interval([0.05]) is None  # one seed: no interval
    assert report.gain_interval([0.05, 0.05]) == pytest.approx((0.05, 0.05))  # no spread: width 0


def test_gain_paired_by_seed():
    """A trainer run for one seed only is compared with the bounds of that seed, not with their mean over seeds."""
    results = [_result(bm.LOWER, "SupervisedTrainer", 2, 0, (0.4, 0.4), 4.0),
               _result(bm.LOWER, "SupervisedTrainer", 2, 1, (0.8, 0.8), 4.0),
               _result(bm.UPPER, "SupervisedTrainer", None, 0, (0.9, 0.9), 1.0),
               _result(bm.UPPER, "SupervisedTrainer", None, 1, (0.9, 0.9), 1.0),
               _result(bm.SSL, "UAMTTrainer", 2, 1, (0.75, 0.75), 3.0)]
    summary = report.summarise(results, {"1": "gm", "2": "wm"})
    assert summary[0]["Dice mean per seed"] == {0: pytest.approx(0.4), 1: pytest.approx(0.8)}
    gap = "\n".join(report.gap_lines(summary))
    # seed 1 only: 0.75 - 0.8 = -5 points of a 10-point gap (unpaired it would be +15 of 30)
    assert "UAMTTrainer: -5.0 Dice points over the lower bound, -50% of the gap closed; above it in 0 of 1 seed(s) " \
           "(seeds 1: -5.0)" in gap


def test_population_table_and_gains():
    """Dice per test population: each population's cases alone, mean and std over seeds of the per-seed means; each
    trainer's gain over the lower bound within each population, paired by seed."""
    def result(role, trainer, k, seed, a, b):  # case t0 (population "x"): Dice a for both classes; t1 ("y"): b
        return {"role": role, "trainer": trainer, "method": f"{role} ({trainer})" if role != bm.SSL else trainer,
                "num_labeled": k, "seed": seed, "training": {},
                "cases": [{"case": c, "class": cls, "Dice": d, "HD95": 1.0, "ASD": 1.0, "ECE": None}
                          for c, d in (("t0", a), ("t1", b)) for cls in ("1", "2")]}

    results = [result(bm.LOWER, "SupervisedTrainer", 2, 0, 0.5, 0.2), result(bm.LOWER, "SupervisedTrainer", 2, 1,
                                                                             0.7, 0.4),
               result(bm.UPPER, "SupervisedTrainer", None, 0, 0.9, 0.8),
               result(bm.UPPER, "SupervisedTrainer", None, 1, 0.9, 0.8),
               # no gain on x; on y +10 and +20 points
               result(bm.SSL, "MuSTTrainer", 2, 0, 0.5, 0.3), result(bm.SSL, "MuSTTrainer", 2, 1, 0.7, 0.6)]
    classes = {"1": "gm", "2": "wm"}
    per_population = report.population_summaries(results, {"t0": "x", "t1": "y"}, classes)
    lines = report.population_table(per_population, classes).splitlines()
    assert lines[0] == ("| method | labeled | Dice gm, x | Dice wm, x | Dice mean, x | Dice gm, y | Dice wm, y | "
                        "Dice mean, y |")
    # lower bound: x 0.5 and 0.7 over the seeds -> 0.600 +- 0.141; y 0.2 and 0.4 -> 0.300 +- 0.141
    assert lines[2] == ("| lower bound (SupervisedTrainer) | 2 | 0.600 ± 0.141 | 0.600 ± 0.141 | 0.600 ± 0.141 | "
                        "0.300 ± 0.141 | 0.300 ± 0.141 | 0.300 ± 0.141 |")
    assert lines[3].startswith("| MuSTTrainer | 2 | 0.600 ± 0.141 |") and lines[3].endswith("| 0.450 ± 0.212 |")
    assert lines[4].startswith("| upper bound (SupervisedTrainer) | all | 0.900 ± 0.000 |")
    gains = report.population_gap_lines(per_population)
    # x: gap 0.9 - 0.6 = 30 points, MuST level in both seeds; y: gap 0.8 - 0.3 = 50 points, MuST +10 and +20:
    # +15 (standard error 5, t(0.975, 1 dof) 12.706 -> -48.5 to +78.5), 30% of the gap
    assert gains[0] == "- test population x:" and "upper − lower bound = 30.0 Dice points" in gains[1]
    assert gains[2] == ("    - MuSTTrainer: +0.0 Dice points over the lower bound (95% confidence interval +0.0 to "
                        "+0.0), 0% of the gap closed; above it in 0 of 2 seed(s) (seeds 0, 1: +0.0, +0.0).")
    assert gains[3] == "- test population y:" and "upper − lower bound = 50.0 Dice points" in gains[4]
    assert gains[5] == ("    - MuSTTrainer: +15.0 Dice points over the lower bound (95% confidence interval -48.5 to "
                        "+78.5), 30% of the gap closed; above it in 2 of 2 seed(s) (seeds 0, 1: +10.0, +20.0).")
    assert len(gains) == 6
    assert report.population_summaries(results, {"t0": "x", "t1": "x"}, classes) == {}  # one population
    assert report.population_table({}, classes) == "" and report.population_gap_lines({}) == []


def test_report_from_the_run_files_with_the_environment(tmp_path):
    """The report is built from the runs' metrics files and names the processor and package versions (a seeded CPU
    run repeats its numbers only with the same ones); every file is written whole: no temporary file is left."""
    from importlib.metadata import version

    work = tmp_path / "work"
    for r in (_result(bm.LOWER, "SupervisedTrainer", 2, 0, (0.5, 0.7), 4.0),
              _result(bm.SSL, "MuSTTrainer", 2, 0, (0.7, 0.7), 3.0),
              _result(bm.UPPER, "SupervisedTrainer", None, 0, (0.9, 0.9), 1.0)):
        run = bm.Run(r["role"], r["trainer"], r["num_labeled"], r["seed"])
        (work / "runs" / run.env_name).mkdir(parents=True, exist_ok=True)
        (work / "runs" / run.env_name / f"metrics_{run.name}.json").write_text(json.dumps(r))
    # t1, the only case of population "y", has no Dice (empty reference and prediction): nothing to compare there
    ctx = bm.Context(971, "Dataset971_Tiny", tmp_path, tmp_path, "nnUNetPlans", [], [], [], ["t0", "t1"], False,
                     {"1": "gm", "2": "wm"}, {"t0": "x", "t1": "y"})
    md = bm.write_report(_settings(tmp_path), ctx)
    text = md.read_text()
    assert "| lower bound (SupervisedTrainer) | 2 | 1 | 0.500 |" in text
    assert "| lower bound (SupervisedTrainer) | 2 | 0.500 | 0.700 | 0.600 | n/a | n/a | n/a |" in text
    assert "- test population x:\n  - 2 labeled: upper − lower bound = 30.0 Dice points" in text
    assert "    - MuSTTrainer: +10.0 Dice points over the lower bound, 33% of the gap closed" in text
    assert "test population y" not in text
    assert f"torch {version('torch')}, nnunetv2 {version('nnunetv2')}, numpy {version('numpy')}" in text
    with open(work / "results.csv") as f:
        assert len(list(csv.DictReader(f))) == 9  # 3 runs x 3 case-class rows
    assert sorted(p.name for p in work.iterdir()) == ["benchmark.md", "dice_per_trainer.png", "results.csv", "runs",
                                                      "summary.csv"]


def test_dice_against_labeled_count_plot_has_whole_case_ticks(tmp_path, monkeypatch):
    import matplotlib.figure

    ticks = []
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig",
                        lambda fig, path, **kw: (ticks.append([list(ax.get_xticks()) for ax in fig.axes]),
                                                 Path(path).write_bytes(b"png")))
    results = [_result(bm.LOWER, "SupervisedTrainer", k, seed, (0.5 + 0.05 * k, 0.6), 4.0)
               for k in (1, 3) for seed in (0, 1)]
    results += [_result(bm.UPPER, "SupervisedTrainer", None, seed, (0.9, 0.9), 1.0) for seed in (0, 1)]
    written = report.plots(results, report.summarise(results, {"1": "gm", "2": "wm"}), tmp_path)
    assert [p.name for p in written] == ["dice_per_trainer.png", "dice_vs_labeled.png"]
    assert ticks[-1] == [[1, 3]]  # the labeled counts, not 1.25, 1.5, ...


def test_replace_atomic_keeps_the_old_file_when_writing_fails(tmp_path):
    from nnunet_ssl.data.unlabeled import replace_atomic

    target = tmp_path / "benchmark.md"
    target.write_text("old")

    def fail(tmp: str) -> None:
        Path(tmp).write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        replace_atomic(fail, target)
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["benchmark.md"]
    replace_atomic(lambda tmp: Path(tmp).write_text("new"), target)
    assert target.read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["benchmark.md"]


def _weights(checkpoint: Path) -> dict:
    return torch.load(checkpoint, map_location="cpu", weights_only=False)["network_weights"]


@pytest.mark.slow
def test_benchmark_runs_and_resumes(demo, tmp_path):
    work = tmp_path / "work"
    cmd = [str(Path(sys.executable).parent / "nnunet_ssl"), "benchmark", "-d", str(demo.dataset_id), "--work-dir",
           str(work), "-c", "3d_fullres", "--num-labeled", "2", "--seeds", "0", "--trainers", "MuSTTrainer",
           "--hparams", json.dumps(SHORT), "--device", "cpu", "--disable-tta", "-np", "1", "--prediction-workers", "0",
           "--augmentation-workers", "0",  # with the run's seed, training is repeatable on the CPU
           "--feature-scale", "0.5",  # every run on the plans with half the planned width
           "--placebo"]  # and MuST's placebo, apart from MuST
    first = demo.run(*cmd)
    runs = work / "runs"
    assert sorted(p.name for p in runs.iterdir()) == ["all_seed0", "n2_seed0"]
    labeled = json.loads((runs / "n2_seed0" / "labeled_cases.json").read_text())["labeled"]
    assert len(labeled) == 2
    declared = json.loads((runs / "n2_seed0" / "nnUNet_preprocessed" / demo.name / "ssl_unlabeled_cases.json")
                          .read_text())["0"]
    assert len(declared) == 2 and not set(declared) & set(labeled)  # fold 0 has 4 training cases
    assert not (runs / "all_seed0" / "nnUNet_preprocessed" / demo.name / "ssl_unlabeled_cases.json").exists()
    lower_log = next((runs / "n2_seed0" / "nnUNet_results").rglob("SupervisedTrainer*/fold_0/training_log_*.txt"))
    assert "2 labeled training case(s) remain" in lower_log.read_text()
    assert lower_log.parent.parent.name == "SupervisedTrainer__nnUNetPlans_width0.5__3d_fullres"
    planned = json.loads((demo.pp / "nnUNetPlans.json").read_text())["configurations"]["3d_fullres"]
    trained = json.loads((lower_log.parent.parent / "plans.json").read_text())["configurations"]["3d_fullres"]
    assert [2 * f for f in trained["architecture"]["arch_kwargs"]["features_per_stage"]] == \
        planned["architecture"]["arch_kwargs"]["features_per_stage"]
    assert trained["batch_size"] == planned["batch_size"]
    metrics = sorted(runs.glob("*/metrics_*.json"))
    assert [p.name for p in metrics] == ["metrics_upper_SupervisedTrainer.json", "metrics_MuSTTrainer.json",
                                         "metrics_lower_SupervisedTrainer.json", "metrics_placebo_MuSTTrainer.json"]
    for m in metrics:
        r = json.loads(m.read_text())
        assert len(r["cases"]) == 2 * 2  # 2 test cases x 2 classes
        assert all(0 <= c["Dice"] <= 1 and c["HD95"] >= 0 for c in r["cases"] if np.isfinite(c["Dice"]))
        assert r["training"]["seconds_per_iteration"] > 0 and r["training"]["peak_rss_mib"] > 0
        placebo = {"consistency_weight": 0.0} if r["role"] == bm.PLACEBO else {}
        assert r["hparams"] == {**SHORT, "final_validation_mirroring": False, **placebo, "seed": 0}
    # the placebo trained MuST's network with its consistency weight at 0, in its own results folder
    placebo_log = next((runs / "n2_seed0" / "nnUNet_results_placebo").rglob("MuSTTrainer*/fold_0/training_log_*.txt"))
    assert '"consistency_weight": 0.0' in placebo_log.read_text().replace("'", '"')
    assert (runs / "n2_seed0" / "nnUNet_results" / demo.name / "MuSTTrainer__nnUNetPlans_width0.5__3d_fullres" /
            "fold_0" / "checkpoint_final.pth").is_file()
    with open(work / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4 * 4 and {r["method"] for r in rows} == {
        "lower bound (SupervisedTrainer)", "MuSTTrainer", "MuSTTrainer (placebo)", "upper bound (SupervisedTrainer)"}
    table = (work / "benchmark.md").read_text()
    assert "| MuSTTrainer | 2 | 1 |" in table and "Dice points" in table
    assert "| MuSTTrainer (placebo) | 2 | 1 |" in table and "- over its placebo: " in table
    assert "`(placebo)`: the trainer with the weights of its unsupervised losses at 0 (MuSTTrainer: " \
           "consistency_weight)" in table
    assert "training seeded with each run's seed, 0 augmentation worker(s)" in table
    assert (work / "dice_per_trainer.png").stat().st_size > 0 and (work / "summary.csv").is_file()
    assert first.stdout.count("done in") == 4
    predict_logs = sorted(runs.glob("*/logs/predict_*.log"))
    assert len(predict_logs) == 4 and all("non-multiprocessing mode" in p.read_text() for p in predict_logs)

    # resume: nothing finished is repeated; a run that lost only its evaluation is predicted and evaluated again,
    # without training; a run that lost its training is trained again, seeded as before, with the same result
    lower_fold = lower_log.parent
    lower_metrics = runs / "n2_seed0" / "metrics_lower_SupervisedTrainer.json"
    lower_cases = json.dumps(json.loads(lower_metrics.read_text())["cases"])  # NaN-safe comparison
    lower_weights = _weights(lower_fold / "checkpoint_final.pth")
    checkpoints = {p: p.stat().st_mtime_ns for p in runs.rglob("checkpoint_final.pth") if lower_fold not in p.parents}
    (runs / "n2_seed0" / "metrics_MuSTTrainer.json").unlink()
    lower_metrics.unlink()
    shutil.rmtree(lower_fold)
    second = demo.run(*cmd)
    assert second.stdout.count("already finished, skipped") == 2 and second.stdout.count("done in") == 2
    assert "training MuSTTrainer" not in second.stdout and "training lower bound" in second.stdout
    assert {p: p.stat().st_mtime_ns for p in runs.rglob("checkpoint_final.pth")
            if lower_fold not in p.parents} == checkpoints
    assert (runs / "n2_seed0" / "metrics_MuSTTrainer.json").is_file()
    assert json.dumps(json.loads(lower_metrics.read_text())["cases"]) == lower_cases
    again = _weights(lower_fold / "checkpoint_final.pth")
    assert again.keys() == lower_weights.keys() and all(torch.equal(again[k], lower_weights[k]) for k in again)

    # other settings in the same work folder are refused before anything runs
    bad = demo.run(*[a if a != json.dumps(SHORT) else json.dumps({**SHORT, "num_epochs": 2}) for a in cmd],
                   check=False)
    assert bad.returncode != 0 and "other settings" in bad.stderr and "hparams" in bad.stderr

    # a finished training not yet evaluated but made with other hyper-parameters is refused, and the refused command
    # leaves benchmark.json as it was (the original command still resumes)
    (runs / "n2_seed0" / "metrics_MuSTTrainer.json").unlink()
    settings_file = (work / "benchmark.json").read_text()
    other = demo.run(*cmd, "--trainer-hparams", 'MuSTTrainer={"temperature": 0.25}', check=False)
    assert other.returncode != 0 and "holds a finished training of MuSTTrainer made with other hyper-parameters " \
                                     "(temperature: 0.8 there, 0.25 now)" in other.stderr
    assert (work / "benchmark.json").read_text() == settings_file and "training MuSTTrainer" not in other.stdout
