"""The benchmark's report: per-method summaries over seeds, gains paired by seed with their confidence intervals,
per-population tables and the plots, from the ``metrics_*.json`` files that ``benchmark.py`` writes per run.

Each metrics file holds one run (``method``, ``role``, ``trainer``, ``num_labeled``, ``seed``, ``training`` cost and
per case and class ``Dice``, ``HD95``, ``ASD``, ``ECE``). The summaries, gains and tables are pure functions of
those rows, so a report can be rebuilt from stored runs; ``collect`` reads the files, ``plots`` and ``write_csv``
write whole files (temporary file, then rename), ``environment`` names the processor and package versions.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np

from nnunet_ssl.data.unlabeled import replace_atomic

LOWER, UPPER, SSL, PLACEBO = "lower bound", "upper bound", "semi-supervised", "placebo"


def placebo_method(trainer: str) -> str:
    return f"{trainer} (placebo)"


METRICS = ("Dice", "HD95", "ASD", "ECE")


def collect(work_dir: Path) -> list[dict]:
    results = []
    for f in sorted((work_dir / "runs").glob("*/metrics_*.json")):
        results.append(json.loads(f.read_text()))
    return results


def _method_order(results: list[dict]) -> list[str]:
    roles = {r["method"]: r["role"] for r in results}
    rank = {LOWER: 0, SSL: 1, PLACEBO: 1, UPPER: 2}  # a placebo right after its trainer ("X" < "X (placebo)")
    return sorted(roles, key=lambda m: (rank[roles[m]], m))


def summarise(results: list[dict], class_names: dict[str, str]) -> list[dict]:
    """One row per (method, labeled count): mean and standard deviation over seeds of the per-seed test-set means
    (NaN-skipping, as nnU-Net's summary; a seed without any finite value adds nothing)."""
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        groups.setdefault((r["method"], r["num_labeled"]), []).append(r)
    rows = []
    for (method, k), runs in groups.items():
        classes = sorted({c["class"] for r in runs for c in r["cases"]}, key=lambda c: (len(c), c))
        row = {"method": method, "role": runs[0]["role"], "num_labeled": k, "seeds": sorted(r["seed"] for r in runs)}
        for metric in METRICS:
            for cls in [*classes, "mean"]:
                per_seed = {}
                for r in sorted(runs, key=lambda r: r["seed"]):
                    vals = [c[metric] for c in r["cases"] if (cls == "mean" or c["class"] == cls)
                            and c[metric] is not None and np.isfinite(c[metric])]
                    if vals:  # a seed with no finite value (every reference and prediction empty) has no mean
                        per_seed[r["seed"]] = float(np.mean(vals))
                if per_seed:
                    key = f"{metric} {class_names.get(cls, cls)}"
                    values = list(per_seed.values())
                    row[key] = float(np.mean(values))
                    row[key + " std"] = float(np.std(values, ddof=1)) if len(values) > 1 else float("nan")
                    row[key + " per seed"] = per_seed
        for key in ("seconds_per_iteration", "peak_rss_mib", "peak_cuda_mib"):
            vals = [r["training"][key] for r in runs if r["training"].get(key) is not None]
            row[key] = float(np.mean(vals)) if vals else None
        rows.append(row)
    order = {m: i for i, m in enumerate(_method_order(results))}
    return sorted(rows, key=lambda r: (order[r["method"]], r["num_labeled"] or 0))


def _fmt(mean, std, digits) -> str:
    if mean is None or not np.isfinite(mean):
        return "n/a"
    return f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if std is not None and np.isfinite(std) else "")


def markdown_table(summary: list[dict], class_names: dict[str, str]) -> str:
    names = [*class_names.values(), "mean"]
    metrics = [m for m in METRICS if any(f"{m} mean" in r for r in summary)]

    def columns(m: str) -> list[str]:  # the ECE is the case's foreground ECE, the same in every class row
        return ["mean"] if m == "ECE" else names

    head = ["method", "labeled", "seeds"] + [
        "ECE foreground" if m == "ECE" else f"{m} {n}" for m in metrics for n in columns(m)] + [
        "s/iteration", "peak memory MiB"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in summary:
        mem = r.get("peak_cuda_mib") or r.get("peak_rss_mib")
        cells = [r["method"], "all" if r["num_labeled"] is None else str(r["num_labeled"]), str(len(r["seeds"]))]
        for m in metrics:
            digits = 3 if m in ("Dice", "ECE") else 2
            cells += [_fmt(r.get(f"{m} {n}"), r.get(f"{m} {n} std"), digits) for n in columns(m)]
        cells += [_fmt(r.get("seconds_per_iteration"), None, 3), _fmt(mem, None, 0)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def population_summaries(results: list[dict], populations: dict[str, str],
                         class_names: dict[str, str]) -> dict[str, list[dict]]:
    """Per test population (e.g. the cohort's source anatomy of each test subject), ``summarise`` over that
    population's cases alone; empty with fewer than two populations."""
    names = sorted(set(populations.values()))
    if len(names) < 2:
        return {}
    return {n: summarise([{**res, "cases": [c for c in res["cases"] if populations.get(c["case"]) == n]}
                          for res in results], class_names) for n in names}


def population_table(per_population: dict[str, list[dict]], class_names: dict[str, str]) -> str:
    """Dice per class and mean, per test population (``population_summaries``); empty without populations."""
    if not per_population:
        return ""
    names = list(per_population)
    per_population = {n: {(r["method"], r["num_labeled"]): r for r in rows} for n, rows in per_population.items()}
    columns = [*class_names.values(), "mean"]
    head = ["method", "labeled"] + [f"Dice {c}, {n}" for n in names for c in columns]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key, row in per_population[names[0]].items():
        cells = [row["method"], "all" if row["num_labeled"] is None else str(row["num_labeled"])]
        for n in names:
            r = per_population[n].get(key, {})
            cells += [_fmt(r.get(f"Dice {c}"), r.get(f"Dice {c} std"), 3) for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _paired(row: dict, reference: dict) -> dict[int, float]:
    """Per seed that both rows ran: row's test-set mean Dice minus reference's."""
    a, b = row.get("Dice mean per seed", {}), reference.get("Dice mean per seed", {})
    return {s: a[s] - b[s] for s in sorted(set(a) & set(b))}


def gain_interval(gains: list[float], level: float = 0.95) -> tuple[float, float] | None:
    """Confidence interval of the mean of per-seed paired gains (Student's t with n - 1 degrees of freedom; None
    below two seeds). Each seed draws its own labeled cases and training noise, so the interval says how sure the
    seeds make the mean gain, labeled draw included; with three seeds each side is 2.5 standard deviations of
    the gains wide."""
    if len(gains) < 2:
        return None
    from scipy import stats

    mean, sem = float(np.mean(gains)), float(stats.sem(gains))
    if sem == 0:  # the same gain in every seed (scipy's interval would be NaN)
        return mean, mean
    low, high = stats.t.interval(level, len(gains) - 1, loc=mean, scale=sem)
    return float(low), float(high)


def bound_gaps(summary: list[dict]) -> tuple[dict | None, list[tuple[dict, float]]]:
    """The upper bound's row (None without one) and, per lower-bound row, that row with upper − lower mean Dice
    (an empty list without an upper bound); rows without any Dice (every case empty) are left out."""
    upper = next((r for r in summary if r["role"] == UPPER and "Dice mean" in r), None)
    if upper is None:
        return None, []
    return upper, [(r, upper["Dice mean"] - r["Dice mean"]) for r in summary if r["role"] == LOWER and "Dice mean" in r]


def _gain_text(gains: dict[int, float], reference: str, gap: float | None = None) -> str:
    """'+x Dice points over <reference> (95% confidence interval), share of the gap; above it in n of m seed(s)'."""
    gain = float(np.mean(list(gains.values())))
    interval = gain_interval(list(gains.values()))
    ci = f" (95% confidence interval {100 * interval[0]:+.1f} to {100 * interval[1]:+.1f})" if interval else ""
    closed = f", {100 * gain / gap:.0f}% of the gap closed" if gap is not None and abs(gap) > 1e-9 else ""
    per_seed = ", ".join(f"{100 * g:+.1f}" for g in gains.values())
    return (f"{100 * gain:+.1f} Dice points over {reference}{ci}{closed}; above it in "
            f"{sum(g > 0 for g in gains.values())} of {len(gains)} seed(s) (seeds {', '.join(map(str, gains))}: "
            f"{per_seed})")


def gap_lines(summary: list[dict]) -> list[str]:
    """The gap between the bounds and, per semi-supervised trainer (and placebo), its gain over the lower bound with
    the 95% confidence interval of that mean and the share of the gap it closes, all paired by seed (only the seeds
    the trainer, the lower and the upper bound all ran); for a trainer whose placebo ran, its gain over the placebo
    too (paired by the seeds both ran)."""
    upper, bounds = bound_gaps(summary)
    lines = []
    for lower, gap in bounds:
        lines.append(f"- {lower['num_labeled']} labeled: upper − lower bound = {100 * gap:.1f} Dice points "
                     f"(lower {lower['Dice mean']:.3f} ± {lower['Dice mean std']:.3f}, upper "
                     f"{upper['Dice mean']:.3f} ± {upper['Dice mean std']:.3f}; mean over seeds ± std).")
        gaps = _paired(upper, lower)
        same_count = {r["method"]: r for r in summary if r["num_labeled"] == lower["num_labeled"]}
        for r in same_count.values():
            if r["role"] not in (SSL, PLACEBO):
                continue
            gains = {s: g for s, g in _paired(r, lower).items() if s in gaps}
            if not gains:
                continue
            seed_gap = float(np.mean([gaps[s] for s in gains]))
            lines.append(f"  - {r['method']}: {_gain_text(gains, 'the lower bound', seed_gap)}.")
            placebo = same_count.get(placebo_method(r["method"])) if r["role"] == SSL else None
            over_placebo = _paired(r, placebo) if placebo is not None else {}
            if over_placebo:
                lines.append(f"    - over its placebo: {_gain_text(over_placebo, 'the placebo')}.")
    return lines


def population_gap_lines(per_population: dict[str, list[dict]]) -> list[str]:
    """``gap_lines`` within each test population: a trainer's gain can sit in one population (say, the anatomy
    only the unlabeled images show) and vanish in the mean over all test cases."""
    lines = []
    for name, summary in per_population.items():
        within = gap_lines(summary)
        if within:
            lines += [f"- test population {name}:", *[f"  {line}" for line in within]]
    return lines


def plots(results: list[dict], summary: list[dict], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    counts = sorted({r["num_labeled"] for r in summary if r["num_labeled"] is not None})
    methods = _method_order(results)
    fig, axes = plt.subplots(1, max(1, len(counts)), figsize=(max(6, 1.1 * len(methods)) * max(1, len(counts)), 4.5),
                             squeeze=False)
    for ax, k in zip(axes[0], counts or [None]):
        shown = [m for m in methods if any(r["method"] == m and r["num_labeled"] in (k, None) for r in summary)]
        for i, m in enumerate(shown):
            row = next(r for r in summary if r["method"] == m and r["num_labeled"] in (k, None))
            seeds = list(row["Dice mean per seed"].values())
            ax.scatter([i] * len(seeds), seeds, s=14, color="grey", zorder=2)
            ax.errorbar([i], [row["Dice mean"]], yerr=[0 if not np.isfinite(row["Dice mean std"])
                                                       else row["Dice mean std"]],
                        fmt="o", color={SSL: "C0", PLACEBO: "C1"}.get(row["role"], "C3"), capsize=4, zorder=3)
        ax.set_xticks(range(len(shown)), shown, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel("test Dice (mean over foreground classes)")
        ax.set_title(f"{k} labeled" if k is not None else "")
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    replace_atomic(lambda tmp: fig.savefig(tmp, dpi=110, format="png"), out / "dice_per_trainer.png")
    plt.close(fig)
    written.append(out / "dice_per_trainer.png")
    if len(counts) > 1:
        fig, ax = plt.subplots(figsize=(6, 4.5))
        for m in methods:
            rows = sorted((r for r in summary if r["method"] == m), key=lambda r: r["num_labeled"] or 0)
            if rows[0]["role"] == UPPER:
                ax.axhline(rows[0]["Dice mean"], color="k", ls="--", label=m)
                continue
            x = [r["num_labeled"] for r in rows]
            y = np.array([r["Dice mean"] for r in rows])
            s = np.nan_to_num(np.array([r["Dice mean std"] for r in rows]))
            ax.plot(x, y, "o-", label=m)
            ax.fill_between(x, y - s, y + s, alpha=0.15)
        ax.set_xticks(counts)  # labeled counts are whole cases
        ax.set_xlabel("labeled cases")
        ax.set_ylabel("test Dice (mean over foreground classes)")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        replace_atomic(lambda tmp: fig.savefig(tmp, dpi=110, format="png"), out / "dice_vs_labeled.png")
        plt.close(fig)
        written.append(out / "dice_vs_labeled.png")
    return written


def environment(device: str) -> str:
    """The processor and the packages that decide the floating-point results: a seeded CPU run repeats its numbers
    only on the same processor model and package versions."""
    import platform
    from importlib.metadata import version

    import torch

    if device == "cuda":
        processor = torch.cuda.get_device_name(0)
    else:
        cpuinfo = Path("/proc/cpuinfo")
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                 if line.startswith("model name")] if cpuinfo.is_file() else []
        processor = f"CPU ({os.cpu_count()} cores, {names[0] if names else platform.processor() or platform.machine()})"
    return f"{processor}; " + ", ".join(f"{p} {version(p)}" for p in ("torch", "nnunetv2", "numpy"))


def write_csv(path: Path, rows: list[dict]) -> None:
    keys = list(dict.fromkeys(k for r in rows for k in r))

    def write(tmp: str) -> None:
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, keys)
            w.writeheader()
            w.writerows(rows)
    replace_atomic(write, path)


def gap_warning(summary: list[dict], aim: float = 0.10) -> str | None:
    """A warning naming the labeled count(s) whose gap between the bounds is under ``aim`` (mean Dice over seeds),
    with the gap to two decimals (so that 9.98 points is not shown as "10.0"); None when every gap reaches it."""
    small = [(r, g) for r, g in bound_gaps(summary)[1] if g < aim - 1e-9]  # tolerance: round-off at the aim
    if not small:
        return None
    named = ", ".join(f"{100 * g:.2f} points with {r['num_labeled']} labeled" for r, g in small)
    return (f"warning: the upper bound beats the lower bound by less than {100 * aim:g} Dice points ({named}); "
            "unlabeled data can hardly show an effect on this dataset (change the cohort, not the methods).")


