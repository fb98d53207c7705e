"""Labeled-fraction experiments: declare training cases of a fully labeled dataset as unlabeled, per fold.

The file ``nnUNet_preprocessed/DatasetXXX_Name/ssl_unlabeled_cases.json`` sits beside nnU-Net's
``splits_final.json`` and maps a fold (``"0"``, ``"1"``, ... or ``"all"`` for every fold) to the training
cases whose labels are treated as absent::

    {"0": ["case_003", "case_007"], "1": ["case_001"]}

For such a fold the semi-supervised trainers drop these cases from the labeled training set and preprocess
their *images only* (from ``imagesTr``) into the unlabeled folder: their label files, their preprocessed
``_seg`` arrays and the label-derived ``class_locations`` are never opened.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from nnunetv2.utilities.crossval_split import generate_crossval_split

from nnunet_ssl.data.unlabeled import UnlabeledDataError, write_json_atomic

FILENAME = "ssl_unlabeled_cases.json"


def declared_unlabeled_cases(preprocessed_dataset_folder_base: str | Path, fold: int | str | None) -> list[str]:
    """Cases declared unlabeled for ``fold`` (empty if there is no file or no entry for the fold); with
    ``fold=None`` the cases of every entry."""
    path = Path(preprocessed_dataset_folder_base) / FILENAME
    if not path.is_file():
        return []
    try:
        content = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UnlabeledDataError(f"{path}: not valid JSON ({e}). Fix it or delete it.") from None
    if not isinstance(content, dict) or not all(
        isinstance(v, list) and all(isinstance(c, str) for c in v) for v in content.values()
    ):
        raise UnlabeledDataError(
            f'{path}: expected an object mapping a fold ("0", "1", ... or "all") to a list of case ids, '
            f'e.g. {{"0": ["case_003"]}}. Fix it or delete it.'
        )
    if fold is None:
        return sorted({c for v in content.values() for c in v})
    cases = content.get(str(fold), content.get("all", []))
    return sorted(set(cases))


def check_declared_cases(
    declared: list[str], tr_keys: list[str], val_keys: list[str], fold: int | str, file: str | Path
) -> None:
    """A declared case must be a training case of this fold; a validation case keeps its label."""
    problems = []
    for case in declared:
        if case in val_keys and fold != "all":
            problems.append(f"'{case}' is a validation case of fold {fold}; only training cases can be declared "
                            f"unlabeled (validation needs labels). Remove it from the list for this fold.")
        elif case not in tr_keys:
            problems.append(f"'{case}' is not a training case of fold {fold}. Check the spelling or the fold.")
    if len(set(tr_keys) - set(declared)) == 0:
        problems.append(f"every training case of fold {fold} is declared unlabeled; keep at least one labeled.")
    if problems:
        raise UnlabeledDataError(f"{file}:\n  " + "\n  ".join(problems))


def make_labeled_fraction(
    preprocessed_dataset_folder_base: str | Path,
    case_ids: list[str],
    fraction: float | None = None,
    num_labeled: int | None = None,
    seed: int = 0,
    folds: list[int] | None = None,
) -> dict[str, list[str]]:
    """Write ``ssl_unlabeled_cases.json`` keeping ``fraction`` (or ``num_labeled``) of each fold's training
    cases labeled, chosen at random with ``seed``. Uses ``splits_final.json``; when it does not exist yet it is
    created exactly as nnU-Net's trainer would (5 folds, seed 12345) so the folds agree."""
    if (fraction is None) == (num_labeled is None):
        raise ValueError("give exactly one of fraction or num_labeled")
    if fraction is not None and not 0 < fraction < 1:
        raise ValueError(f"fraction must lie in (0, 1), got {fraction}")
    base = Path(preprocessed_dataset_folder_base)
    splits_file = base / "splits_final.json"
    if splits_file.is_file():
        splits = json.loads(splits_file.read_text())
    else:
        splits = generate_crossval_split(sorted(case_ids), seed=12345, n_splits=5)
        write_json_atomic(splits, splits_file)
    folds = list(range(len(splits))) if folds is None else folds
    result: dict[str, list[str]] = {}
    for fold in folds:
        if fold >= len(splits):
            raise ValueError(f"fold {fold} is not in {splits_file} ({len(splits)} folds)")
        train = sorted(splits[fold]["train"])
        n_keep = num_labeled if num_labeled is not None else max(1, round(fraction * len(train)))
        if not 1 <= n_keep < len(train):
            raise ValueError(f"fold {fold} has {len(train)} training cases; cannot keep {n_keep} labeled")
        keep = set(np.random.default_rng(seed + fold).choice(train, n_keep, replace=False).tolist())
        result[str(fold)] = [c for c in train if c not in keep]
    write_json_atomic(result, base / FILENAME)
    return result
