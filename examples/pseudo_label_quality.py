"""How good were a self-training run's pseudo-labels? Each round's pseudo-labels against reference label maps.

    python examples/pseudo_label_quality.py FOLD_FOLDER REFERENCE_FOLDER

FOLD_FOLDER is a POPCORNTrainer or LocalContrastiveTrainer fold folder (its pseudo-labels are stored at the
preprocessed resolution: ``popcorn_pseudo_labels/`` with the rounds of ``popcorn_state.json``, or
``pseudo_labels/round_<r>/``). REFERENCE_FOLDER is a preprocessed folder of the same plans and configuration that
holds ``{case}_seg.b2nd`` for these cases, e.g. the benchmark's upper-bound run, where every training case is
labeled (``<work dir>/runs/all_seed<s>/nnUNet_preprocessed/<dataset>/<plans>_<configuration>``).

Per round: the cases, each foreground label's share of the annotated voxels in the pseudo-labels and in the
references, and the Dice of each label (pseudo-label against reference, over the round's cases together). Then the
same over all rounds, per group of cases (the case name up to its last underscore: ``wide_003`` is in ``wide``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import blosc2
import numpy as np

from nnunet_ssl.training.pseudo_labels import SEG_SUFFIX, label_shares


def rounds(fold: Path) -> list[tuple[str, Path, list[str]]]:
    """(round name, pseudo-label folder, cases) for each round of the fold folder."""
    state = fold / "popcorn_state.json"
    if state.is_file():
        folder = fold / "popcorn_pseudo_labels"
        return [(f"round {r['round']} (epoch {r['epoch']})", folder, [e["case"] for e in r["selected"]])
                for r in json.loads(state.read_text())["rounds"]]
    folders = sorted((fold / "pseudo_labels").glob("round_*"), key=lambda p: int(p.name.split("_")[1]))
    if not folders:
        sys.exit(f"{fold}: neither popcorn_state.json nor pseudo_labels/round_*/; give a POPCORNTrainer or "
                 f"LocalContrastiveTrainer fold folder")
    return [(p.name.replace("_", " "), p, sorted(f.name[: -len(SEG_SUFFIX)] for f in p.glob(f"*{SEG_SUFFIX}")))
            for p in folders]


def load(path: Path) -> np.ndarray:
    return np.asarray(blosc2.open(urlpath=str(path), mode="r")[:])


def main(fold: Path, reference: Path) -> None:
    found = rounds(fold)
    cases = {c for _, _, cs in found for c in cs}
    missing = sorted(c for c in cases if not (reference / f"{c}{SEG_SUFFIX}").is_file())
    if missing:
        sys.exit(f"{reference}: no reference label map for {missing[:5]}{' ...' if len(missing) > 5 else ''}; give "
                 f"the preprocessed folder (same plans and configuration) of a dataset where these cases are labeled")
    references = {c: load(reference / f"{c}{SEG_SUFFIX}") for c in sorted(cases)}
    labels = sorted({int(v) for seg in references.values() for v in np.unique(seg) if v > 0})
    print("round | cases | " + " | ".join(f"label {v} share (pseudo / reference) | Dice {v}" for v in labels))
    pseudo = {}
    for name, folder, cs in found:
        pseudo.update({c: load(folder / f"{c}{SEG_SUFFIX}") for c in cs})
        print(row(name, [pseudo[c] for c in cs], [references[c] for c in cs], labels))
    groups: dict[str, list[str]] = {}
    for c in sorted(pseudo):
        groups.setdefault(c.rsplit("_", 1)[0], []).append(c)
    for group, cs in groups.items():
        print(row(f"all rounds, {group}", [pseudo[c] for c in cs], [references[c] for c in cs], labels))


def row(name: str, pseudo: list[np.ndarray], ref: list[np.ndarray], labels: list[int]) -> str:
    """A table row: the cases, then per label its shares (pseudo-labels / references) and the pooled Dice."""
    shares, ref_shares = label_shares(pseudo, labels), label_shares(ref, labels)
    cells = []
    for v in labels:
        both = sum(int(((p == v) & (r == v)).sum()) for p, r in zip(pseudo, ref))
        size = sum(int((p == v).sum()) + int((r == v).sum()) for p, r in zip(pseudo, ref))
        dice = f"{2 * both / size:.3f}" if size else "n/a"
        cells.append(f"{shares[v]:.3f} / {ref_shares[v]:.3f} | {dice}")
    return f"{name} | {len(pseudo)} | " + " | ".join(cells)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(Path(sys.argv[1]), Path(sys.argv[2]))
