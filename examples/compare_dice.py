"""Print the Dice of several trainers side by side from nnU-Net's evaluation summaries.

    python examples/compare_dice.py NAME=path/to/summary.json [NAME=path/to/summary.json ...]
"""

from __future__ import annotations

import json
import sys


def main(pairs: list[str]) -> None:
    summaries = {}
    for pair in pairs:
        name, _, path = pair.partition("=")
        with open(path) as f:
            summaries[name] = json.load(f)
    labels = sorted(next(iter(summaries.values()))["mean"], key=lambda k: int(k.strip("()").split(",")[0]))
    width = max(len(n) for n in summaries) + 2
    print("Dice on the test images (nnU-Net's evaluation, mean over cases)")
    print(f"{'trainer':<{width}}" + "".join(f"{'class ' + lab:>14}" for lab in labels) + f"{'mean fg':>14}")
    for name, s in summaries.items():
        row = "".join(f"{s['mean'][lab]['Dice']:>14.4f}" for lab in labels)
        print(f"{name:<{width}}{row}{s['foreground_mean']['Dice']:>14.4f}")


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    main(sys.argv[1:])
