"""Time and peak memory of one training iteration of an nnunet_ssl trainer against plain nnUNetTrainer.

Both trainers are built from the same plans and configuration (same network, patch size and batch size) in one
process and fed identical synthetic batches, so the figures compare the compute of an iteration (forward,
losses, backward, optimizer step; mixed precision and torch.compile on CUDA as nnU-Net does), not data loading,
which runs in background workers for both. The semi-supervised trainer also draws an unlabeled batch of the
labeled batch size. Inference is timed twice: the network in eval mode on one patch (no deep supervision), and
nnU-Net's sliding-window prediction of one whole preprocessed case (``nnUNetPredictor``, nnU-Net's defaults: step
0.5, Gaussian weighting, mirroring) as ``nnUNetv2_predict`` runs it.

    python examples/benchmark_iteration.py -d 990 -c 3d_fullres [--trainer MuSTTrainer MisMatchTrainer]
        [--iterations 20] [--repeats 3]

With ``--repeats R`` the trainers are measured R times in turn and the fastest time of each is kept (the usual
estimator on a shared machine, where other work only ever adds time); on a busy CPU, ``--threads 1`` avoids
threads waiting for each other and gives steadier ratios.

Peak memory is CUDA's max_memory_allocated on a GPU, and the growth of the peak resident set size (VmHWM) over
the resident size before the timed iterations on a CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from copy import deepcopy
from pathlib import Path

import numpy as np
import torch

clock = time.perf_counter  # --cpu-time: time.process_time


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # Linux: resets VmHWM to the current resident size


def synthetic_batch(trainer, generator: torch.Generator) -> dict:
    cm, lm = trainer.configuration_manager, trainer.label_manager
    shape = (trainer.batch_size, trainer.num_input_channels, *cm.patch_size)
    data = torch.randn(shape, generator=generator)
    scales = trainer._get_deep_supervision_scales() or [[1.0] * len(cm.patch_size)]
    channels = len(lm.foreground_regions) if lm.has_regions else 1
    targets = []
    for s in scales:
        size = [round(p * f) for p, f in zip(cm.patch_size, s)]
        high = 2 if lm.has_regions else len(lm.all_labels)
        targets.append(torch.randint(0, high, (trainer.batch_size, channels, *size), generator=generator).float())
    return {"data": data, "target": targets if trainer.enable_deep_supervision else targets[0]}


def sliding_window_case(trainer) -> torch.Tensor:
    """The first preprocessed case of the configuration (or, without one, a synthetic image of twice the patch
    size), as nnUNetv2_predict hands it to the sliding-window prediction."""
    keys = trainer.dataset_class.get_identifiers(trainer.preprocessed_dataset_folder)
    if keys:
        data = trainer.dataset_class(trainer.preprocessed_dataset_folder, keys[:1]).load_case(keys[0])[0][:]
        return torch.from_numpy(np.ascontiguousarray(data)).float()
    shape = [2 * p for p in trainer.configuration_manager.patch_size]
    return torch.randn((trainer.num_input_channels, *shape), generator=torch.Generator().manual_seed(0))


def time_sliding_window(trainer, case: torch.Tensor, repeats: int) -> float:
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=True,
                                perform_everything_on_device=True, device=trainer.device, verbose=False,
                                verbose_preprocessing=False, allow_tqdm=False)
    predictor.manual_initialization(trainer.network, trainer.plans_manager, trainer.configuration_manager, None,
                                    trainer.dataset_json, type(trainer).__name__,
                                    trainer.inference_allowed_mirroring_axes)
    predictor.predict_sliding_window_return_logits(case)  # warm-up (compilation, Gaussian cache)
    times = []
    for _ in range(repeats):
        start = clock()
        predictor.predict_sliding_window_return_logits(case)
        if trainer.device.type == "cuda":
            torch.cuda.synchronize()
        times.append(clock() - start)
    return min(times)


def measure(trainer_cls, plans: dict, configuration: str, dataset_json: dict, device: torch.device,
            iterations: int, warmup: int) -> dict:
    trainer = trainer_cls(plans={**deepcopy(plans), "continue_training": False}, configuration=configuration,
                          fold=0, dataset_json=dataset_json, device=device)
    trainer.initialize()
    trainer.network.train()
    g = torch.Generator().manual_seed(0)
    batches = [synthetic_batch(trainer, g) for _ in range(4)]
    if hasattr(trainer, "dataloader_unlabeled"):
        unlabeled = [{"data": b["data"].flip(0)} for b in batches]
        trainer.dataloader_unlabeled = iter(unlabeled * (iterations + warmup))
    trainer.on_train_epoch_start()

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    for i in range(warmup):
        trainer.train_step(batches[i % 4])
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    else:
        base = _rss_kib("VmRSS")
        _reset_peak_rss()
    start = clock()
    for i in range(iterations):
        trainer.train_step(batches[i % 4])
    sync()
    seconds = (clock() - start) / iterations
    peak_mib = (torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda"
                else (_rss_kib("VmHWM") - base) / 1024)

    trainer.set_deep_supervision_enabled(False)
    trainer.network.eval()
    x = batches[0]["data"][:1].to(device)
    with torch.no_grad(), torch.autocast(device.type, enabled=device.type == "cuda"):
        for _ in range(max(1, warmup)):
            trainer.network(x)
        sync()
        start = clock()
        for _ in range(iterations):
            trainer.network(x)
        sync()
    inference = (clock() - start) / iterations
    case = sliding_window_case(trainer)
    sliding = time_sliding_window(trainer, case, max(1, min(iterations, 3)))
    return {"trainer": trainer_cls.__name__, "seconds_per_iteration": seconds, "peak_memory_mib": peak_mib,
            "inference_seconds_per_patch": inference, "sliding_window_seconds_per_case": sliding,
            "case_shape": list(case.shape[1:]), "batch_size": trainer.batch_size,
            "patch_size": list(trainer.configuration_manager.patch_size)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-d", required=True, help="dataset name or id (planned with nnUNetv2_plan_and_preprocess)")
    parser.add_argument("-c", default="3d_fullres", help="configuration (default 3d_fullres)")
    parser.add_argument("-p", default="nnUNetPlans", help="plans identifier")
    parser.add_argument("--trainer", nargs="+", default=["MuSTTrainer"],
                        help="nnunet_ssl trainer(s) to compare (default MuSTTrainer)")
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=1, help="measure every trainer this many times in turn and "
                                                                  "keep the fastest times")
    parser.add_argument("--warmup", type=int, default=3, help="untimed iterations first (torch.compile, caches)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's); 1 gives "
                                                                    "the steadiest ratios on a shared machine")
    parser.add_argument("--cpu-time", action="store_true", help="time with this process's CPU time instead of the "
                                                                  "wall clock (CPU only; with --threads 1 the time "
                                                                  "other programs take on a shared machine drops out)")
    parser.add_argument("--json", help="also write the figures to this JSON file")
    args = parser.parse_args()
    global clock
    if args.cpu_time:
        if args.device != "cpu":
            parser.error("--cpu-time measures CPU work; use it with --device cpu")
        clock = time.process_time

    from nnunetv2.paths import nnUNet_preprocessed
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    from nnunet_ssl.trainers import TRAINERS

    name = maybe_convert_to_dataset_name(args.d)
    pp = Path(nnUNet_preprocessed.require()) / name
    plans = json.loads((pp / f"{args.p}.json").read_text())
    dataset_json = json.loads((pp / "dataset.json").read_text())
    device = torch.device(args.device)
    os.environ["nnUNet_results"] = tempfile.mkdtemp(prefix="nnunet_ssl_benchmark_")  # trainers create folders
    torch.set_num_threads(args.threads or torch.get_num_threads())
    classes = [nnUNetTrainer] + [TRAINERS[t] for t in args.trainer]
    rounds = [[measure(cls, plans, args.c, dataset_json, device, args.iterations, args.warmup) for cls in classes]
              for _ in range(args.repeats)]
    timed = ("seconds_per_iteration", "inference_seconds_per_patch", "sliding_window_seconds_per_case")
    results = [{**per_round[0], **{k: min(r[k] for r in per_round) for k in timed},
                "peak_memory_mib": max(r["peak_memory_mib"] for r in per_round)} for per_round in zip(*rounds)]
    base = results[0]
    hardware = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"CPU, {torch.get_num_threads()} threads"
    print(f"{name} {args.c}: patch {base['patch_size']}, batch {base['batch_size']} labeled (+ the same number of "
          f"unlabeled for the semi-supervised trainers), sliding window over a case of {base['case_shape']}, "
          f"{hardware}, torch {torch.__version__}, best of {args.repeats}"
          f"{', CPU time' if args.cpu_time else ''}")
    print(f"{'trainer':<18}{'s/iteration':>14}{'peak MiB':>12}{'inference s/patch':>20}{'predict s/case':>17}")
    for r in results:
        print(f"{r['trainer']:<18}{r['seconds_per_iteration']:>14.3f}{r['peak_memory_mib']:>12.0f}"
              f"{r['inference_seconds_per_patch']:>20.4f}{r['sliding_window_seconds_per_case']:>17.3f}")
    keys = ("seconds_per_iteration", "peak_memory_mib", "inference_seconds_per_patch",
            "sliding_window_seconds_per_case")
    ratios = {r["trainer"]: {k: r[k] / base[k] for k in keys} for r in results[1:]}
    for trainer, q in ratios.items():
        print(f"{'ratio ' + trainer:<18}{q['seconds_per_iteration']:>13.2f}x{q['peak_memory_mib']:>11.2f}x"
              f"{q['inference_seconds_per_patch']:>19.2f}x{q['sliding_window_seconds_per_case']:>16.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps({"hardware": hardware, "results": results, "ratios": ratios},
                                              indent=2))


if __name__ == "__main__":
    main()
