"""The benchmark harness: lower bound, every semi-supervised trainer and upper bound, over seeds, on a test set.

    nnunet_ssl benchmark -d 701 --work-dir bench --num-labeled 3 --seeds 0 1 2 [--profile cpu]

For every labeled count k and seed s the same k labeled cases are drawn (``numpy.random.default_rng(s)`` from the
labeled pool: ``cohort.json``'s narrow pool for a cohort made by ``nnunet_ssl make-cohort``, else every training
case of the split) and written as the project's labeled-fraction file ``ssl_unlabeled_cases.json`` (fold 0: the
other training cases). With it, in one nnU-Net environment per (k, s):

- **lower bound**: ``SupervisedTrainer``, i.e. nnU-Net's training on the k labeled cases only (plain
  ``nnUNetTrainer`` would ignore the labeled-fraction file and train on every case);
- **each semi-supervised trainer** (``nnunet_ssl.trainers.TRAINERS`` or ``--trainers``): the k labeled cases plus
  the declared ones and ``imagesUnlabeled/`` as unlabeled images;
- with ``--placebo``, **each trainer's placebo**: the same trainer with the weights of its unsupervised losses at 0
  (``placebo_hparams``), so that it draws the same kind of unlabeled batches but no loss reads them. A trainer that
  beats the lower bound but not its placebo owes the gain to something else than the unlabeled images;

and per seed, without the file, the **upper bound**: ``SupervisedTrainer`` on every training case with its label.
All use the same plans, configuration, fold-0 split (validation cases fixed), schedule (``--hparams``, passed as
``nnUNet_ssl_hparams``; each training seeded with the run's seed) and ``checkpoint_final.pth``; each predicts
``imagesTs`` with ``nnUNetv2_predict`` and is evaluated against ``labelsTs``: nnU-Net's Dice, HD95 and ASD in mm
(``surface.py``), and the expected calibration error (foreground ECE, ``calibration.py``) from the saved
probabilities.

Each (k, s) has its own ``nnUNet_preprocessed`` root (links to the shared preprocessed data, its own split and
labeled-fraction file) and ``nnUNet_results`` root under ``--work-dir``, so runs never overwrite each other. A
finished stage (training: ``checkpoint_final.pth``; prediction and evaluation: ``metrics_<name>.json``) is not
repeated; an interrupted training resumes with ``--c``. The report (``benchmark.md``, ``results.csv``,
``summary.csv``, plots; ``report.py``) is rewritten from every finished run after each run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from nnunet_ssl.data.labeled_fraction import FILENAME as LABELED_FRACTION_FILE
from nnunet_ssl.data.unlabeled import write_json_atomic, write_text_atomic
from nnunet_ssl.evaluation.report import (
    LOWER,
    METRICS,
    PLACEBO,
    SSL,
    UPPER,
    collect,
    environment,
    gap_lines,
    gap_warning,
    markdown_table,
    placebo_method,
    plots,
    population_gap_lines,
    population_summaries,
    population_table,
    summarise,
    write_csv,
)

BASELINE = "SupervisedTrainer"
SCHEDULE_KEYS = ("num_epochs", "num_iterations_per_epoch", "num_val_iterations_per_epoch", "save_every")

PROFILES: dict[str, dict] = {
    # 2d plans at half the planned width: on 2 idle CPU cores 1.2-3 minutes per run, about 20 minutes per seed
    # with every trainer (docs/benchmarks.md)
    "cpu": {"configuration": "2d", "batch_size": 8, "feature_scale": 0.5, "device": "cpu", "seeds": [0, 1, 2],
            "num_labeled": [3], "disable_tta": True, "augmentation_workers": 0, "prediction_workers": 0,
            "hparams": {"num_epochs": 12, "num_iterations_per_epoch": 25, "num_val_iterations_per_epoch": 4,
                        "save_every": 4}},
    # 3d_fullres on one GPU, long enough for the losses to flatten on the cohort (2 mm voxels, see the docs)
    "gpu": {"configuration": "3d_fullres", "batch_size": None, "device": "cuda", "seeds": [0, 1, 2],
            "num_labeled": [2, 4], "disable_tta": False,
            "hparams": {"num_epochs": 150, "num_iterations_per_epoch": 250, "num_val_iterations_per_epoch": 50,
                        "save_every": 25}},
}


def default_processes() -> int:
    """nnU-Net's default process count (nnUNet_def_n_proc), 2 where it is unset."""
    return int(os.environ.get("nnUNet_def_n_proc", "2"))


class BenchmarkError(ValueError):
    """Bad input found before any training; the message says what to change."""


@dataclass
class Settings:
    dataset: str
    work_dir: Path
    configuration: str = "3d_fullres"
    plans: str = "nnUNetPlans"
    batch_size: int | None = None
    feature_scale: float | None = None  # network width: every stage's feature count times this
    device: str = "cuda"
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    num_labeled: list[int] = field(default_factory=list)
    fractions: list[float] = field(default_factory=list)
    trainers: list[str] | None = None  # None: every semi-supervised trainer of the registry
    bounds: bool = True
    hparams: dict = field(default_factory=dict)
    trainer_hparams: dict[str, dict] = field(default_factory=dict)
    placebo: bool = False  # also each trainer's placebo (its unsupervised loss weights at 0)
    disable_tta: bool = False
    seed_training: bool = True  # each run's training seeded with the run's seed (trainer hyper-parameter `seed`)
    augmentation_workers: int | None = None  # nnUNet_n_proc_DA for training; None: the environment's
    save_probabilities: bool = True
    num_processes: int = field(default_factory=default_processes)  # read when the settings are made
    # nnUNetv2_predict's -npp/-nps and the evaluation's processes; 0: all in the calling process (nnU-Net's
    # sequential prediction), quicker on a few CPU cores, where worker start-up outweighs the overlap;
    # None: num_processes. The predictions are the same either way.
    prediction_workers: int | None = None

    @property
    def prediction_processes(self) -> int:
        return self.num_processes if self.prediction_workers is None else self.prediction_workers

    def fingerprint(self) -> dict:
        """What must not change between calls on the same work folder (seeds, counts and trainers may grow)."""
        return {"dataset": self.dataset, "configuration": self.configuration, "plans": self.plans,
                "batch_size": self.batch_size, "feature_scale": self.feature_scale, "hparams": self.hparams,
                "trainer_hparams": self.trainer_hparams, "disable_tta": self.disable_tta,
                "seed_training": self.seed_training}


@dataclass
class Context:
    dataset_id: int
    name: str
    raw: Path
    pp: Path
    plans_identifier: str
    train: list[str]
    val: list[str]
    pool: list[str]
    test: list[str]
    has_unlabeled_folder: bool
    class_names: dict[str, str]
    test_populations: dict[str, str] = field(default_factory=dict)  # test case -> the cohort's source anatomy


@dataclass
class Run:
    role: str  # LOWER, SSL, PLACEBO or UPPER
    trainer: str
    num_labeled: int | None  # None for the upper bound
    seed: int

    @property
    def env_name(self) -> str:
        return f"all_seed{self.seed}" if self.role == UPPER else f"n{self.num_labeled}_seed{self.seed}"

    @property
    def name(self) -> str:
        return {LOWER: "lower_", UPPER: "upper_", PLACEBO: "placebo_"}.get(self.role, "") + self.trainer

    @property
    def method(self) -> str:
        if self.role == PLACEBO:
            return placebo_method(self.trainer)
        return f"{self.role} ({self.trainer})" if self.role != SSL else self.trainer

    @property
    def results_folder(self) -> str:
        """nnUNet_results inside the run's environment; a placebo trains the same trainer class, so apart."""
        return "nnUNet_results_placebo" if self.role == PLACEBO else "nnUNet_results"


# ---------------------------------------------------------------------------------------------- set-up
def _env(ctx_env: Path | None = None, hparams: dict | None = None, augmentation_workers: int | None = None,
         results_folder: str = "nnUNet_results") -> dict:
    from nnunet_ssl.ext_trainers_path import trainers_path

    env = {**os.environ, "nnUNet_extTrainer": str(trainers_path())}
    env.pop("nnUNet_ssl_hparams", None)
    if ctx_env is not None:
        env["nnUNet_preprocessed"] = str(ctx_env / "nnUNet_preprocessed")
        env["nnUNet_results"] = str(ctx_env / results_folder)
    if hparams is not None:
        env["nnUNet_ssl_hparams"] = json.dumps(hparams)
    if augmentation_workers is not None:
        env["nnUNet_n_proc_DA"] = str(augmentation_workers)
    return env


def _run_cmd(cmd: list[str], env: dict, log: Path) -> None:
    exe = Path(sys.executable).parent / cmd[0]
    if exe.exists():
        cmd = [str(exe), *cmd[1:]]
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as f:
        f.write(f"\n$ {' '.join(cmd)}\n")
        f.flush()
        proc = subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:3])} ... failed (exit {proc.returncode}); see {log}")


def _cases(folder: Path, ending: str, channel: bool) -> list[str]:
    if not folder.is_dir():
        return []
    suffix = "_0000" + ending if channel else ending
    return sorted(f.name[: -len(suffix)] for f in folder.iterdir() if f.name.endswith(suffix))


def trainer_classes() -> dict:
    from nnunet_ssl.trainers import TRAINERS

    return TRAINERS


def default_ssl_trainers() -> list[str]:
    from nnunet_ssl.training.base import SemiSupervisedTrainer

    return sorted(n for n, cls in trainer_classes().items() if issubclass(cls, SemiSupervisedTrainer))


def labeled_counts(settings: Settings, pool_size: int, pool_is_all_training: bool) -> list[int]:
    counts = list(settings.num_labeled) + [max(1, round(f * pool_size)) for f in settings.fractions]
    if not counts:
        raise BenchmarkError("give a labeled count (--num-labeled K) or fraction (--fraction F)")
    for f in settings.fractions:
        if not 0 < f <= 1:
            raise BenchmarkError(f"--fraction {f}: give a fraction in (0, 1]")
    limit = pool_size - 1 if pool_is_all_training else pool_size
    for k in counts:
        if not 1 <= k <= limit:
            raise BenchmarkError(
                f"labeled count {k} does not fit the labeled pool of {pool_size} case(s)"
                + (" (one training case at least must stay unlabeled)" if pool_is_all_training else "")
                + f": choose 1 to {limit}.")
    return sorted(set(counts))


def _check_hparams(settings: Settings, trainers: list[str]) -> None:
    from nnunet_ssl.training.hparams import HParamError, resolve_hparams

    classes = trainer_classes()
    seeded_by_hand = (["--hparams"] if "seed" in settings.hparams else []) + \
        [f"--trainer-hparams {n}" for n, h in settings.trainer_hparams.items() if "seed" in h]
    if seeded_by_hand:
        raise BenchmarkError(f"'seed' in {seeded_by_hand[0]}: the harness seeds each run's training with the run's "
                             "seed (--seeds); remove it (--no-seed-training trains unseeded, as nnU-Net)")
    checks = [(name, False) for name in {BASELINE, *trainers}] + [(name, True) for name in placebos(settings, trainers)]
    for name, placebo in checks:
        try:
            resolve_hparams(classes[name].hparam_spec, name, hparams_for(settings, name, placebo=placebo))
        except HParamError as e:
            raise BenchmarkError(f"{e}{' (its placebo)' if placebo else ''}") from None
    for name in settings.trainer_hparams:
        if name not in classes:
            raise BenchmarkError(f"--trainer-hparams names unknown trainer '{name}'")


def placebos(settings: Settings, trainers: list[str]) -> list[str]:
    """The trainers whose placebo runs: with ``settings.placebo``, every one that has a placebo."""
    classes = trainer_classes()
    return [t for t in trainers if settings.placebo and getattr(classes[t], "placebo_hparams", lambda: None)()]


def hparams_for(settings: Settings, trainer: str, seed: int | None = None, placebo: bool = False) -> dict:
    """The common schedule plus the trainer's own values (the baseline gets only keys it knows), for its placebo
    with the unsupervised weights at 0, and, with ``settings.seed_training``, the run's ``seed``; with
    ``settings.disable_tta`` the final validation predicts unmirrored too, as the test set is."""
    cls = trainer_classes()[trainer]
    common = {k: v for k, v in settings.hparams.items() if k in cls.hparam_spec or trainer != BASELINE}
    seeded = {"seed": seed} if settings.seed_training and seed is not None else {}
    unmirrored = {"final_validation_mirroring": False} if settings.disable_tta else {}
    zeroed = cls.placebo_hparams() if placebo else {}
    return {**unmirrored, **common, **settings.trainer_hparams.get(trainer, {}), **zeroed, **seeded}


def prepare(settings: Settings, log=print) -> tuple[Context, list[Run]]:
    """Check everything, plan and preprocess if needed, fix the split. Raises BenchmarkError on bad input."""
    from nnunetv2.paths import nnUNet_preprocessed, nnUNet_raw
    from nnunetv2.utilities.crossval_split import generate_crossval_split
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    if not nnUNet_raw.is_set() or not nnUNet_preprocessed.is_set():
        raise BenchmarkError("set nnUNet_raw and nnUNet_preprocessed as for nnUNetv2_plan_and_preprocess")
    try:
        name = maybe_convert_to_dataset_name(settings.dataset)
    except RuntimeError as e:
        raise BenchmarkError(f"dataset {settings.dataset}: {e}") from None
    raw = Path(nnUNet_raw.get()) / name
    dataset_json = json.loads((raw / "dataset.json").read_text())
    ending = dataset_json["file_ending"]
    train_all = _cases(raw / "imagesTr", ending, True)
    labeled = set(_cases(raw / "labelsTr", ending, False))
    missing = [c for c in train_all if c not in labeled]
    if not train_all or missing:
        raise BenchmarkError(
            f"{raw}: the benchmark needs a label in labelsTr/ for every training image (the labeled cases and the "
            f"upper bound are drawn from them), but {len(missing) or 'no'} case(s) have none"
            + (f" (e.g. {', '.join(missing[:3])})" if missing else "")
            + ". Put images without labels in imagesUnlabeled/.")
    test = _cases(raw / "imagesTs", ending, True)
    test_labels = set(_cases(raw / "labelsTs", ending, False))
    if not test or any(c not in test_labels for c in test):
        raise BenchmarkError(f"{raw}: the benchmark evaluates on imagesTs/ against labelsTs/; "
                             f"{'no test images' if not test else 'some test images have no label'} found.")
    if settings.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise BenchmarkError("--device cuda, but torch sees no GPU; use --device cpu (or --profile cpu)")
    classes = trainer_classes()
    trainers = settings.trainers if settings.trainers is not None else default_ssl_trainers()
    unknown = [t for t in trainers if t not in classes]
    if unknown:
        raise BenchmarkError(f"unknown trainer(s) {', '.join(unknown)}; available: {', '.join(sorted(classes))}")
    trainers = [t for t in trainers if t != BASELINE]  # the baseline runs as the bounds
    _check_hparams(settings, trainers)
    for flag, workers in (("--augmentation-workers", settings.augmentation_workers),
                          ("--prediction-workers", settings.prediction_workers)):
        if workers is not None and workers < 0:
            raise BenchmarkError(f"{flag} {workers}: give 0 or more")
    if settings.feature_scale is not None and not settings.feature_scale > 0:
        raise BenchmarkError(f"--feature-scale {settings.feature_scale}: give a number above 0 (1: the planned width)")

    cohort_file = raw / "cohort.json"
    cohort = json.loads(cohort_file.read_text()) if cohort_file.is_file() else {}
    pp = Path(nnUNet_preprocessed.get()) / name
    if cohort.get("validation"):
        val = sorted(cohort["validation"])
    else:
        splits_file = pp / "splits_final.json"
        splits = json.loads(splits_file.read_text()) if splits_file.is_file() else \
            generate_crossval_split(train_all, seed=12345, n_splits=5)
        val = sorted(splits[0]["val"])
    train = [c for c in train_all if c not in val]
    pool = sorted(cohort["labeled_pool"]) if cohort.get("labeled_pool") else train
    if any(c not in train for c in pool):
        raise BenchmarkError(f"{cohort_file}: the labeled pool names cases that are not training cases")
    counts = labeled_counts(settings, len(pool), pool == train)
    has_unlabeled = any((raw / "imagesUnlabeled").glob("*" + ending))

    plans_identifier = _ensure_preprocessed(settings, name, pp, len(train_all), log)
    runs = plan_runs(settings, trainers, counts, log)
    class_names = {str(v): k for k, v in dataset_json["labels"].items() if k != "background"}
    populations = {s["case"]: s["source"] for s in cohort.get("subjects", []) if s["case"] in test}
    ctx = Context(int(name[7:10]), name, raw, pp, plans_identifier, train, val, pool, test, has_unlabeled,
                  class_names, populations)
    _check_finished_trainings(settings, ctx, runs)  # first: a refused command must not rewrite benchmark.json
    _check_work_dir(settings, ctx)
    return ctx, runs


def plan_runs(settings: Settings, trainers: list[str], counts: list[int], log=print) -> list[Run]:
    """The runs in order: the bounds of every seed first (the gap they show decides whether comparing methods makes
    sense at all), then per seed and labeled count each trainer, followed by its placebo with ``--placebo``."""
    runs = []
    if settings.bounds:
        for seed in settings.seeds:
            runs += [Run(LOWER, BASELINE, k, seed) for k in counts] + [Run(UPPER, BASELINE, None, seed)]
    with_placebo = placebos(settings, trainers)
    if settings.placebo and len(with_placebo) < len(trainers):
        log(f"no placebo for {', '.join(t for t in trainers if t not in with_placebo)}: its unlabeled images enter "
            f"through no weighted loss (e.g. as pseudo-labeled training cases); it runs without one")
    return runs + [Run(role, t, k, seed) for seed in settings.seeds for k in counts for t in trainers
                   for role in ((SSL, PLACEBO) if t in with_placebo else (SSL,))]


def _ensure_preprocessed(settings: Settings, name: str, pp: Path, n_cases: int, log) -> str:
    dataset_id = name[7:10]
    plans_file = pp / f"{settings.plans}.json"
    n = str(settings.num_processes)
    if not plans_file.is_file():
        if settings.plans != "nnUNetPlans":
            raise BenchmarkError(f"{plans_file} not found; plan the dataset with those plans first")
        log(f"planning and preprocessing {name} ({settings.configuration}) ...")
        env = _env()
        if env.get("nnUNet_n_proc_DA") == "0":  # nnU-Net's planner sets torch's threads to it and fails on 0
            env["nnUNet_n_proc_DA"] = n
        _run_cmd(["nnUNetv2_plan_and_preprocess", "-d", dataset_id, "-c", settings.configuration, "-np", n],
                 env, settings.work_dir / "logs" / "preprocess.log")
    plans = json.loads(plans_file.read_text())
    if settings.configuration not in plans["configurations"]:
        raise BenchmarkError(f"configuration '{settings.configuration}' is not in {plans_file} (it has "
                             f"{', '.join(plans['configurations'])})")
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    data_id = PlansManager(plans).get_configuration(settings.configuration).data_identifier
    data = pp / data_id
    done = len([f for f in data.glob("*.b2nd") if not f.name.endswith("_seg.b2nd")]) if data.is_dir() else 0
    if done != n_cases:
        log(f"preprocessing {name} {settings.configuration} ...")
        _run_cmd(["nnUNetv2_preprocess", "-d", dataset_id, "-plans_name", settings.plans, "-c",
                  settings.configuration, "-np", n], _env(), settings.work_dir / "logs" / "preprocess.log")
    if settings.batch_size is None and settings.feature_scale is None:
        return settings.plans
    # same plans with another batch size or network width: a new plans identifier sharing the preprocessed data
    # (data_identifier)
    identifier = settings.plans + (f"_bs{settings.batch_size}" if settings.batch_size is not None else "") + \
        (f"_width{settings.feature_scale:g}" if settings.feature_scale is not None else "")
    plans["plans_name"] = identifier
    cfg = plans["configurations"][settings.configuration]
    if "inherits_from" in cfg:
        resolved = PlansManager(plans).get_configuration(settings.configuration).configuration
        cfg = plans["configurations"][settings.configuration] = {k: v for k, v in resolved.items()}
    if settings.batch_size is not None:
        cfg["batch_size"] = settings.batch_size
    if settings.feature_scale is not None:
        arch = cfg["architecture"]["arch_kwargs"]
        if "features_per_stage" not in arch:
            raise BenchmarkError(f"--feature-scale: the {settings.configuration} architecture of {plans_file} has "
                                 f"no features_per_stage to scale")
        arch["features_per_stage"] = [max(1, round(f * settings.feature_scale)) for f in arch["features_per_stage"]]
    write_json_atomic(plans, pp / f"{identifier}.json")
    return identifier


def _check_work_dir(settings: Settings, ctx: Context) -> None:
    settings.work_dir.mkdir(parents=True, exist_ok=True)
    f = settings.work_dir / "benchmark.json"
    now = {**settings.fingerprint(), "dataset": ctx.name, "val": ctx.val, "pool": ctx.pool}
    if f.is_file():
        before = json.loads(f.read_text())
        before.setdefault("seed_training", False)  # folders from before the harness seeded training
        before = {k: before.get(k) for k in now}
        if before != now:
            diff = sorted(k for k in now if before.get(k) != now[k])
            raise BenchmarkError(f"{settings.work_dir} holds runs made with other settings ({', '.join(diff)} "
                                 f"differ); use another --work-dir or the same settings.")
    write_json_atomic(now, f)


def _check_finished_trainings(settings: Settings, ctx: Context, runs: list[Run]) -> None:
    """A run not yet evaluated whose training finished is only predicted and evaluated on resume, so that training
    must have been made with the hyper-parameters asked for now (benchmark.json guards the whole folder; this
    guards a fold left over when benchmark.json was removed or a folder copied in)."""
    import torch

    from nnunet_ssl.training.hparams import checkpoint_hparams, resolve_hparams

    classes = trainer_classes()
    for run in runs:
        fold = fold_folder(settings, ctx, settings.work_dir / "runs" / run.env_name, run)
        if metrics_file(settings, run).is_file() or not (fold / "checkpoint_final.pth").is_file():
            continue
        spec = classes[run.trainer].hparam_spec
        state = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False).get("nnunet_ssl", {})
        saved = checkpoint_hparams(spec, run.trainer, state.get("hparams", {}))
        asked = resolve_hparams(spec, run.trainer, hparams_for(settings, run.trainer, run.seed,
                                                               placebo=run.role == PLACEBO))
        diff = [f"{k}: {saved[k]!r} there, {v!r} now" for k, v in asked.items() if saved[k] != v]
        if diff:
            raise BenchmarkError(f"{fold} holds a finished training of {run.method} made with other hyper-parameters "
                                 f"({'; '.join(diff)}); delete that fold_0 folder to train it again, or use another "
                                 f"--work-dir.")


def _choose_labeled(pool: list[str], k: int, seed: int) -> list[str]:
    """The k labeled cases of seed s: as ``nnunet_ssl labeled-fraction --num-labeled k --seed s`` draws them for
    fold 0 (``default_rng(seed + fold)``), from the labeled pool."""
    return sorted(np.random.default_rng(seed).choice(sorted(pool), k, replace=False).tolist())


def setup_env(settings: Settings, ctx: Context, run: Run) -> Path:
    """The run's nnU-Net environment: preprocessed data linked from the shared folder, its own split and
    labeled-fraction file. Returns its folder."""
    root = settings.work_dir / "runs" / run.env_name
    pp = root / "nnUNet_preprocessed" / ctx.name
    pp.mkdir(parents=True, exist_ok=True)
    for entry in ctx.pp.iterdir():
        if entry.name in ("splits_final.json", LABELED_FRACTION_FILE) or entry.name.endswith("_unlabeled"):
            continue
        link = pp / entry.name
        if not link.exists() and not link.is_symlink():
            link.symlink_to(entry.resolve(), target_is_directory=entry.is_dir())
    write_json_atomic([{"train": ctx.train, "val": ctx.val}], pp / "splits_final.json")
    if run.role != UPPER:
        labeled = _choose_labeled(ctx.pool, run.num_labeled, run.seed)
        write_json_atomic({"0": [c for c in ctx.train if c not in labeled]}, pp / LABELED_FRACTION_FILE)
        write_json_atomic({"labeled": labeled}, root / "labeled_cases.json")
    return root


# ---------------------------------------------------------------------------------------------- one run
def fold_folder(settings: Settings, ctx: Context, root: Path, run: Run) -> Path:
    return root / run.results_folder / ctx.name / f"{run.trainer}__{ctx.plans_identifier}__{settings.configuration}" \
        / "fold_0"


def metrics_file(settings: Settings, run: Run) -> Path:
    return settings.work_dir / "runs" / run.env_name / f"metrics_{run.name}.json"


def _take_lock(path: Path) -> bool:
    """A per-run lock so that several harness processes can share a work folder (e.g. one per GPU): False if a
    live process holds it. A lock left by a dead process is taken over."""
    path.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                pid = int(path.read_text() or 0)
                os.kill(pid, 0)
                return False  # alive
            except (ValueError, ProcessLookupError, FileNotFoundError):
                path.unlink(missing_ok=True)  # stale
                continue
            except PermissionError:
                return False
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))
        return True
    return False


def execute(settings: Settings, ctx: Context, run: Run, log=print) -> bool | None:
    """Train, predict and evaluate one run, skipping what is done. Returns False if it was already finished, None
    if another harness process is running it."""
    out = metrics_file(settings, run)
    if out.is_file():
        return False
    lock = out.with_suffix(".lock")
    if not _take_lock(lock):
        return None
    try:
        return _execute(settings, ctx, run, out, log)
    finally:
        lock.unlink(missing_ok=True)


def _execute(settings: Settings, ctx: Context, run: Run, out: Path, log) -> bool:
    root = setup_env(settings, ctx, run)
    hparams = hparams_for(settings, run.trainer, run.seed, placebo=run.role == PLACEBO)
    env = _env(root, hparams, settings.augmentation_workers, run.results_folder)
    fold = fold_folder(settings, ctx, root, run)
    logs = root / "logs"
    pred = root / f"pred_{run.name}"
    if not (fold / "checkpoint_final.pth").is_file():
        shutil.rmtree(pred, ignore_errors=True)  # predictions of an earlier training must not be continued
        log(f"[{run.env_name}] training {run.method} ...")
        _run_cmd([sys.executable, "-m", "nnunet_ssl.evaluation.measured_train", str(root / f"train_{run.name}.json"),
                  str(ctx.dataset_id), settings.configuration, "0", "-tr", run.trainer, "-p", ctx.plans_identifier,
                  "-device", settings.device, "--c"], env, logs / f"train_{run.name}.log")
    log(f"[{run.env_name}] predicting the test set with {run.method} ...")
    cmd = ["nnUNetv2_predict", "-i", str(ctx.raw / "imagesTs"), "-o", str(pred), "-d", str(ctx.dataset_id),
           "-c", settings.configuration, "-p", ctx.plans_identifier, "-tr", run.trainer, "-f", "0",
           "-chk", "checkpoint_final.pth", "-device", settings.device, "-npp", str(settings.prediction_processes),
           "-nps", str(settings.prediction_processes), "--continue_prediction"]
    if settings.disable_tta:
        cmd.append("--disable_tta")
    if settings.save_probabilities:
        cmd.append("--save_probabilities")
    _run_cmd(cmd, env, logs / f"predict_{run.name}.log")
    log(f"[{run.env_name}] evaluating {run.method} ...")
    cases = evaluate_folder(pred, ctx.raw / "labelsTs", ctx.test, ctx.raw / "dataset.json",
                            fold.parent / "plans.json", settings.prediction_processes)  # plans: beside the folds
    result = {"role": run.role, "trainer": run.trainer, "method": run.method, "num_labeled": run.num_labeled,
              "seed": run.seed, "hparams": hparams, "cases": cases, "training": training_cost(root, run, fold)}
    if run.role != UPPER:
        result["labeled_cases"] = json.loads((root / "labeled_cases.json").read_text())["labeled"]
    write_json_atomic(result, out)
    return True


def training_cost(root: Path, run: Run, fold: Path) -> dict:
    """Wall time per training iteration (median epoch time / iterations per epoch; an epoch also holds nnU-Net's
    validation iterations and logging) and peak memory of the training process."""
    import torch

    ckpt = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    starts, ends = ckpt["logging"]["epoch_start_timestamps"], ckpt["logging"]["epoch_end_timestamps"]
    durations = [e - s for s, e in zip(starts, ends)][1:] or [ends[0] - starts[0]]
    iters = ckpt.get("nnunet_ssl", {}).get("hparams", {}).get("num_iterations_per_epoch", 250)
    stats_file = root / f"train_{run.name}.json"
    stats = json.loads(stats_file.read_text()) if stats_file.is_file() else {}
    return {"seconds_per_iteration": float(np.median(durations)) / iters, "epochs": len(starts),
            "peak_rss_mib": stats.get("peak_rss_mib"), "peak_cuda_mib": stats.get("peak_cuda_mib"),
            "train_wall_s": stats.get("wall_s")}


# ---------------------------------------------------------------------------------------------- evaluation
def calibration_error(probabilities_file: Path, reference: np.ndarray, label_manager) -> float | None:
    """Foreground expected calibration error (``calibration.case_calibration``) of one case's probabilities as
    ``nnUNetv2_predict --save_probabilities`` wrote them; None without that file."""
    from nnunet_ssl.evaluation.calibration import case_calibration

    if not probabilities_file.is_file():
        return None
    with np.load(probabilities_file) as npz:
        probabilities = npz["probabilities"]
    lm = label_manager
    bins = case_calibration(probabilities, reference, lm.foreground_regions if lm.has_regions else
                            lm.foreground_labels, lm.has_regions, lm.ignore_label)
    ece = bins["foreground"].ece()
    return float(ece) if np.isfinite(ece) else None


def _evaluate_case(args) -> list[dict]:
    from nnunetv2.evaluation.evaluate_predictions import compute_metrics, region_or_label_to_mask

    from nnunet_ssl.evaluation.surface import surface_metrics

    case, pred_file, ref_file, rw_class, labels_or_regions, ignore_label, label_manager = args
    rw = rw_class()
    nn = compute_metrics(str(ref_file), str(pred_file), rw, labels_or_regions, ignore_label)["metrics"]
    ref, props = rw.read_seg(str(ref_file))
    pred, _ = rw.read_seg(str(pred_file))
    ref, pred = ref[0], pred[0]
    spacing = props["spacing"][-ref.ndim:]
    ignore = ref == ignore_label if ignore_label is not None else None
    ece = calibration_error(Path(str(pred_file)[: -len(".nii.gz")] + ".npz") if str(pred_file).endswith(".nii.gz")
                            else pred_file.with_suffix(".npz"), ref, label_manager)
    rows = []
    for r in labels_or_regions:
        p = region_or_label_to_mask(pred, r)
        if ignore is not None:
            p = p & ~ignore
        s = surface_metrics(p, region_or_label_to_mask(ref, r), spacing)
        rows.append({"case": case, "class": str(r), "Dice": float(nn[r]["Dice"]), "HD95": s["HD95"],
                     "ASD": s["ASD"], "ECE": ece})
    return rows


def evaluate_folder(pred: Path, ref: Path, cases: list[str], dataset_json_file: Path, plans_file: Path,
                    num_processes: int = 2) -> list[dict]:
    """Per case and class: nnU-Net's Dice, HD95 and ASD (mm), and the calibration error where available."""
    from multiprocessing import get_context

    from nnunetv2.imageio.reader_writer_registry import determine_reader_writer_from_dataset_json
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    dataset_json = json.loads(Path(dataset_json_file).read_text())
    ending = dataset_json["file_ending"]
    lm = PlansManager(json.loads(Path(plans_file).read_text())).get_label_manager(dataset_json)
    rw_class = determine_reader_writer_from_dataset_json(dataset_json, str(ref / (cases[0] + ending)))
    labels = lm.foreground_regions if lm.has_regions else lm.foreground_labels
    jobs = [(c, pred / (c + ending), ref / (c + ending), rw_class, labels, lm.ignore_label, lm) for c in cases]
    missing = [str(j[1]) for j in jobs if not j[1].is_file()]
    if missing:
        raise RuntimeError(f"predictions missing: {', '.join(missing[:3])}")
    if num_processes > 1:
        with get_context("spawn").Pool(num_processes) as pool:
            out = pool.map(_evaluate_case, jobs)
    else:
        out = [_evaluate_case(j) for j in jobs]
    return [row for rows in out for row in rows]


# ---------------------------------------------------------------------------------------------- report
def write_report(settings: Settings, ctx: Context) -> Path | None:
    results = collect(settings.work_dir)
    if not results:
        return None
    out = settings.work_dir
    rows = [{"method": r["method"], "role": r["role"], "trainer": r["trainer"], "num_labeled": r["num_labeled"],
             "seed": r["seed"], **{k: c[k] for k in ("case", "class", *METRICS)},
             "class_name": ctx.class_names.get(c["class"], c["class"])} for r in results for c in r["cases"]]
    write_csv(out / "results.csv", rows)
    summary = summarise(results, ctx.class_names)
    write_csv(out / "summary.csv", [{k: v for k, v in r.items() if not k.endswith("per seed")} for r in summary])
    figures = plots(results, summary, out)
    hardware = environment(settings.device)
    text = [f"# Benchmark: {ctx.name}, {settings.configuration}", "",
            (f"- plans `{ctx.plans_identifier}`, schedule `{json.dumps(settings.hparams)}`"
             + (f", per trainer {json.dumps(settings.trainer_hparams)}" if settings.trainer_hparams else "")),
            (f"- {len(ctx.train)} training cases ({len(ctx.pool)} in the labeled pool), {len(ctx.val)} validation, "
             f"{len(ctx.test)} test cases; test-time augmentation {'off' if settings.disable_tta else 'on'}; "
             + ("training seeded with each run's seed" if settings.seed_training else "training unseeded")
             + ("" if settings.augmentation_workers is None else
                f", {settings.augmentation_workers} augmentation worker(s)")),
            f"- device: {hardware}; written {time.strftime('%Y-%m-%d %H:%M')}",
            ("- cells: mean ± standard deviation over seeds of the test-set mean (NaN-skipping); HD95 and ASD in mm "
             "(an empty prediction or reference counts as the image diagonal); s/iteration: median epoch wall time "
             "/ iterations per epoch; peak memory: CUDA peak allocated on a GPU, else peak resident set size of the "
             "training process")]
    placebo_trainers = sorted({r["trainer"] for r in results if r["role"] == PLACEBO})
    if placebo_trainers:
        classes = trainer_classes()
        zeroed = "; ".join(f"{t}: {', '.join(classes[t].placebo_hparams())}" for t in placebo_trainers)
        text.append(f"- `(placebo)`: the trainer with the weights of its unsupervised losses at 0 ({zeroed}): the same "
                    "training and unlabeled batches, but no loss reads an unlabeled image")
    text += ["", markdown_table(summary, ctx.class_names), "", *gap_lines(summary), ""]
    per_population = population_summaries(results, ctx.test_populations, ctx.class_names)
    if per_population:
        text += [("Per test population (the source anatomy of each test subject, from `cohort.json`): mean ± "
                  "standard deviation over seeds of the population's test-set mean."), "",
                 population_table(per_population, ctx.class_names), "", *population_gap_lines(per_population), ""]
    text += [*[f"![{f.stem}]({f.name})" for f in figures], ""]
    write_text_atomic("\n".join(text), out / "benchmark.md")
    return out / "benchmark.md"


# ---------------------------------------------------------------------------------------------- entry point
def _log(message: str) -> None:
    print(message, flush=True)


def benchmark(settings: Settings, log=_log) -> Path | None:
    ctx, runs = prepare(settings, log)
    log(f"{len(runs)} run(s): {', '.join(sorted({r.method for r in runs}))}; seeds {settings.seeds}")
    gap_shown = False
    for i, run in enumerate(runs):
        if run.role == SSL and not gap_shown:
            gap_shown = True
            report = write_report(settings, ctx)
            summary = summarise(collect(settings.work_dir), ctx.class_names)
            for line in gap_lines(summary):
                log(line)
            warning = gap_warning(summary)
            if warning:
                log(warning)
        t = time.time()
        done = execute(settings, ctx, run, log)
        if done:
            log(f"[{i + 1}/{len(runs)}] {run.env_name} {run.method} done in {time.time() - t:.0f} s")
            write_report(settings, ctx)
        elif done is None:
            log(f"[{i + 1}/{len(runs)}] {run.env_name} {run.method} is being run by another process, skipped")
        else:
            log(f"[{i + 1}/{len(runs)}] {run.env_name} {run.method} already finished, skipped")
    report = write_report(settings, ctx)
    log(f"report: {report}")
    return report


def _json_arg(value: str) -> dict:
    text = Path(value).read_text() if not value.lstrip().startswith("{") and Path(value).is_file() else value
    try:
        out = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not a JSON object or a JSON file: {value} ({e})") from None
    if not isinstance(out, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {value}")
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("-d", required=True, help="dataset name or id (nnUNet_raw/preprocessed as for nnU-Net)")
    p.add_argument("--work-dir", required=True, type=Path, help="folder for every run, the table and the plots; "
                                                                "call again with it to resume")
    p.add_argument("--profile", choices=sorted(PROFILES), help="preset configuration, batch size, schedule, seeds, "
                                                              "labeled counts and device (options below override)")
    p.add_argument("-c", dest="configuration", default=None, help="configuration (default 3d_fullres)")
    p.add_argument("-p", dest="plans", default="nnUNetPlans", help="plans identifier")
    p.add_argument("--batch-size", type=int, default=None, help="use the plans with this batch size (written as "
                                                                "plans '<plans>_bs<N>', same preprocessed data)")
    p.add_argument("--feature-scale", type=float, default=None,
                   help="use the plans with every stage's feature count times this (written as plans "
                        "'<plans>[_bs<N>]_width<F>', same preprocessed data); the cpu profile's 0.5 halves the width")
    p.add_argument("--num-labeled", type=int, nargs="+", default=None, help="labeled case count(s)")
    p.add_argument("--fraction", type=float, nargs="+", default=None, help="labeled fraction(s) of the pool")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="seeds (default 0 1 2)")
    p.add_argument("--trainers", nargs="*", default=None, help="semi-supervised trainers (default: every one of "
                                                               "the registry; none: only the bounds)")
    p.add_argument("--no-bounds", action="store_true", help="skip the lower and upper bound")
    p.add_argument("--placebo", action="store_true",
                   help="also train each trainer's placebo: the same trainer with the weights of its unsupervised "
                        "losses at 0, so no loss reads an unlabeled image; the report gives each trainer's gain "
                        "over its placebo (one more run per trainer, labeled count and seed)")
    p.add_argument("--hparams", type=_json_arg, default=None,
                   help="JSON object or file: schedule (and shared hyper-parameters) for every trainer")
    p.add_argument("--trainer-hparams", action="append", default=[], metavar="TRAINER=JSON",
                   help="extra hyper-parameters of one trainer (repeatable)")
    p.add_argument("--device", choices=["cuda", "cpu"], default=None)
    p.add_argument("--disable-tta", action="store_true", default=None, help="no mirroring at prediction")
    p.add_argument("--no-probabilities", action="store_true", help="do not save probabilities (no ECE)")
    p.add_argument("--no-seed-training", action="store_true",
                   help="train unseeded, as nnU-Net (default: each run's training is seeded with its seed)")
    p.add_argument("--augmentation-workers", type=int, default=None,
                   help="nnUNet_n_proc_DA for training (0: augmentation in the training process, which with the "
                        "seed makes CPU runs repeatable; the cpu profile's default)")
    p.add_argument("-np", type=int, default=None, help="processes for preprocessing, prediction and evaluation "
                                                       "(default nnUNet_def_n_proc or 2)")
    p.add_argument("--prediction-workers", type=int, default=None,
                   help="worker processes of nnUNetv2_predict (-npp, -nps) and of the evaluation (default: -np; "
                        "0: all in one process, nnU-Net's sequential prediction, quicker on a few CPU cores; the "
                        "cpu profile's default)")
    p.add_argument("--report-only", action="store_true", help="only rewrite the report from finished runs")


def settings_from_args(args: argparse.Namespace) -> Settings:
    prof = PROFILES.get(args.profile, {}) if args.profile else {}

    def pick(value, key, default):
        return value if value is not None else prof.get(key, default)

    trainer_hparams = {}
    for item in args.trainer_hparams:
        name, _, value = item.partition("=")
        try:
            trainer_hparams[name] = _json_arg(value)
        except argparse.ArgumentTypeError as e:
            raise BenchmarkError(f"--trainer-hparams {name}: {e}") from None
    num_labeled = args.num_labeled
    if num_labeled is None and args.fraction is None:
        num_labeled = prof.get("num_labeled")
    import torch

    return Settings(
        dataset=args.d, work_dir=args.work_dir.resolve(), configuration=pick(args.configuration, "configuration",
                                                                              "3d_fullres"),
        plans=args.plans, batch_size=pick(args.batch_size, "batch_size", None),
        feature_scale=pick(args.feature_scale, "feature_scale", None),
        device=pick(args.device, "device", "cuda" if torch.cuda.is_available() else "cpu"),
        seeds=pick(args.seeds, "seeds", [0, 1, 2]), num_labeled=num_labeled or [], fractions=args.fraction or [],
        trainers=args.trainers, bounds=not args.no_bounds, placebo=args.placebo,
        hparams=pick(args.hparams, "hparams", {}),
        trainer_hparams=trainer_hparams, disable_tta=bool(pick(args.disable_tta, "disable_tta", False)),
        save_probabilities=not args.no_probabilities, seed_training=not args.no_seed_training,
        augmentation_workers=pick(args.augmentation_workers, "augmentation_workers", None),
        prediction_workers=pick(args.prediction_workers, "prediction_workers", None),
        num_processes=args.np or default_processes())


def main_from_args(args: argparse.Namespace) -> None:
    try:
        settings = settings_from_args(args)
        if args.report_only:
            ctx, _ = prepare(settings, _log)
            print(f"report: {write_report(settings, ctx)}")
            return
        benchmark(settings)
    except BenchmarkError as e:
        raise SystemExit(f"error: {e}") from None


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="nnunet_ssl benchmark", description=__doc__.split("\n\n")[0])
    add_arguments(p)
    main_from_args(p.parse_args(argv))


if __name__ == "__main__":
    main()
