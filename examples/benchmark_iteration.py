"""Time and peak memory of one training iteration of an nnunet_ssl trainer against plain nnUNetTrainer.

Both trainers are built from the same plans and configuration (same network, patch size and batch size) in one
process and fed identical synthetic batches, so the figures compare the compute of an iteration (forward,
losses, backward, optimizer step; mixed precision and torch.compile on CUDA as nnU-Net does), not data loading,
which runs in background workers for both. A semi-supervised trainer that draws unlabeled batches gets one of
the labeled batch size (POPCORNTrainer draws none: its pairs are in the labeled batch). Inference (the network
in eval mode, no deep supervision) is timed too.

    python examples/benchmark_iteration.py -d 990 -c 3d_fullres [--trainer MuSTTrainer] [--iterations 20]
    python examples/benchmark_iteration.py -d 990 --trainer POPCORNTrainer --selection-round

``--selection-round`` (trainers with selection rounds, POPCORNTrainer) also times one round on the dataset's real
preprocessed cases (nnUNet_raw must be set: the unlabeled images are checked and preprocessed first): the latent
representation of every labeled training case and every unlabeled case, the proximity graph, and the
pseudo-labels of the selected cases, reported per case.

Peak memory is CUDA's max_memory_allocated on a GPU, and the growth of the peak resident set size (VmHWM) over
the resident size before the timed iterations on a CPU.

LocalContrastiveTrainer is timed after its first pseudo-labels (labeled and pseudo-labeled patches through the
network, the local contrastive loss), the expensive phase; the script then also times one pseudo-label refresh
(nnU-Net's sliding-window prediction of every unlabeled case of the dataset, preprocessed first if needed, which
needs nnUNet_raw) and reports it per case, plain and with the Table VII filter's mirrored second prediction.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import tempfile
import time
from copy import deepcopy
from pathlib import Path

import torch


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _release_freed_memory() -> None:
    """Return memory freed by earlier iterations (or the other trainer) to the OS, so that the resident size before
    the timed iterations counts live memory only (glibc keeps freed heap memory otherwise)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # Linux: resets VmHWM to the current resident size


def synthetic_batch(trainer, generator: torch.Generator) -> dict:
    cm, lm = trainer.configuration_manager, trainer.label_manager
    shape = (trainer.batch_size, trainer.num_input_channels, *cm.patch_size)
    data = torch.randn(shape, generator=generator)
    scales = trainer._get_deep_supervision_scales() or [[1.0] * len(cm.patch_size)]
    channels = 1
    if lm.has_regions:  # region channels, the ignore channel, and LocalContrastiveTrainer's outside-mask channel
        channels = len(lm.foreground_regions) + lm.has_ignore_label + hasattr(trainer, "outside_value")
    targets = []
    for s in scales:
        size = [round(p * f) for p, f in zip(cm.patch_size, s)]
        high = 2 if lm.has_regions else len(lm.all_labels)
        targets.append(torch.randint(0, high, (trainer.batch_size, channels, *size), generator=generator).float())
    return {"data": data, "target": targets if trainer.enable_deep_supervision else targets[0]}


def measure(trainer_cls, plans: dict, configuration: str, dataset_json: dict, device: torch.device,
            iterations: int, warmup: int) -> dict:
    trainer = trainer_cls(plans={**deepcopy(plans), "continue_training": False}, configuration=configuration,
                          fold=0, dataset_json=dataset_json, device=device)
    trainer.initialize()
    trainer.network.train()
    g = torch.Generator().manual_seed(0)
    batches = [synthetic_batch(trainer, g) for _ in range(4)]
    if hasattr(trainer, "dataloader_unlabeled"):
        unlabeled = [{"data": b["data"].flip(0), "target": _full_resolution(b["target"]).flip(0)} for b in batches]
        trainer.dataloader_unlabeled = iter(unlabeled * (iterations + warmup))
    if hasattr(trainer, "pseudo_label_round"):
        trainer.pseudo_label_round = 1  # LocalContrastiveTrainer after its first pseudo-labels
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
        _release_freed_memory()
        base = _rss_kib("VmRSS")
        _reset_peak_rss()
    start = time.perf_counter()
    for i in range(iterations):
        trainer.train_step(batches[i % 4])
    sync()
    seconds = (time.perf_counter() - start) / iterations
    peak_mib = (torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda"
                else (_rss_kib("VmHWM") - base) / 1024)

    trainer.set_deep_supervision_enabled(False)
    trainer.network.eval()
    x = batches[0]["data"][:1].to(device)
    with torch.no_grad(), torch.autocast(device.type, enabled=device.type == "cuda"):
        for _ in range(max(1, warmup)):
            trainer.network(x)
        sync()
        start = time.perf_counter()
        for _ in range(iterations):
            trainer.network(x)
        sync()
    inference = (time.perf_counter() - start) / iterations
    unlabeled = (trainer.hparams["unlabeled_batch_size"] or trainer.batch_size) \
        if getattr(trainer, "draws_unlabeled_batches", False) else 0
    result = {"trainer": trainer_cls.__name__, "seconds_per_iteration": seconds, "peak_memory_mib": peak_mib,
              "inference_seconds_per_patch": inference, "batch_size": trainer.batch_size,
              "unlabeled_batch_size": unlabeled, "patch_size": list(trainer.configuration_manager.patch_size)}
    if hasattr(trainer, "refresh_pseudo_labels"):
        result.update(measure_refresh(trainer))
    return result


def _full_resolution(target):
    return target[0] if isinstance(target, list) else target


def measure_refresh(trainer) -> dict:
    """Seconds per unlabeled case of one pseudo-label refresh (nnU-Net's sliding window on the preprocessed case,
    label map written to the fold folder), without and with the mirrored second prediction of the filter."""
    from nnunet_ssl.data.loader import UnlabeledDataset
    from nnunet_ssl.training.pseudo_labels import predict_pseudo_labels, predict_pseudo_labels_with_agreement

    trainer.unlabeled_identifiers = trainer.prepare_unlabeled_data()
    trainer.configure_rotation_dummyDA_mirroring_and_inital_patch_size()  # inference mirroring axes
    cases = trainer.unlabeled_identifiers
    images = UnlabeledDataset(str(trainer.unlabeled_folder()), cases)
    timings = {}
    for name, predict in (("refresh_seconds_per_case", predict_pseudo_labels),
                          ("refresh_with_filter_seconds_per_case", predict_pseudo_labels_with_agreement)):
        start = time.perf_counter()
        predict(trainer, images, cases, trainer.pseudo_label_store(1))
        timings[name] = (time.perf_counter() - start) / len(cases)
    return {**timings, "unlabeled_cases": len(cases),
            "unlabeled_case_shape": list(images.load_case(cases[0])[0].shape[1:])}


def measure_selection_round(trainer_cls, plans: dict, configuration: str, dataset_json: dict,
                            device: torch.device) -> dict:
    """One selection round of a freshly initialised trainer on all unlabeled cases (the first round: the most
    candidates), with the trainer's default selection size."""
    trainer = trainer_cls(plans={**deepcopy(plans), "continue_training": False}, configuration=configuration,
                          fold=0, dataset_json=dataset_json, device=device)
    trainer.initialize()
    trainer.unlabeled_identifiers = trainer.prepare_unlabeled_data()
    trainer.dataloader_train = trainer.get_paired_training_dataloader()
    trainer.current_epoch = trainer.schedule.first_step_epochs
    try:
        start = time.perf_counter()
        record = trainer.selection_round()  # includes rebuilding the training loader, as in training
        seconds = time.perf_counter() - start
    finally:
        if hasattr(trainer.dataloader_train, "_finish"):
            trainer.dataloader_train._finish()
    encoded = record["training_cases"] + record["candidates"]
    return {"seconds_round": seconds, "unlabeled_candidates": record["candidates"], "cases_encoded": encoded,
            "selected": len(record["selected"]),
            "seconds_per_encoded_case": record["seconds_representations"] / encoded,
            "seconds_per_pseudo_label": record["seconds_pseudo_labels"] / len(record["selected"]),
            "seconds_round_per_unlabeled_case": seconds / record["candidates"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-d", required=True, help="dataset name or id (planned with nnUNetv2_plan_and_preprocess)")
    parser.add_argument("-c", default="3d_fullres", help="configuration (default 3d_fullres)")
    parser.add_argument("-p", default="nnUNetPlans", help="plans identifier")
    parser.add_argument("--trainer", default="MuSTTrainer", help="nnunet_ssl trainer to compare (default MuSTTrainer)")
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3, help="untimed iterations first (torch.compile, caches)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", help="also write the figures to this JSON file")
    parser.add_argument("--selection-round", action="store_true",
                        help="also time one selection round (trainers with selection rounds, e.g. POPCORNTrainer)")
    args = parser.parse_args()

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
    torch.set_num_threads(torch.get_num_threads())
    results = [measure(cls, plans, args.c, dataset_json, device, args.iterations, args.warmup)
               for cls in (nnUNetTrainer, TRAINERS[args.trainer])]
    base, ssl = results
    hardware = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"CPU, {torch.get_num_threads()} threads"
    extra = f" (+{ssl['unlabeled_batch_size']} unlabeled for {ssl['trainer']})" if ssl["unlabeled_batch_size"] else ""
    print(f"{name} {args.c}: patch {base['patch_size']}, batch {base['batch_size']} labeled{extra}, {hardware}, "
          f"torch {torch.__version__}")
    print(f"{'trainer':<16}{'s/iteration':>14}{'peak MiB':>12}{'inference s/patch':>20}")
    for r in results:
        print(f"{r['trainer']:<16}{r['seconds_per_iteration']:>14.3f}{r['peak_memory_mib']:>12.0f}"
              f"{r['inference_seconds_per_patch']:>20.4f}")
    ratios = {k: ssl[k] / base[k] for k in ("seconds_per_iteration", "peak_memory_mib",
                                                 "inference_seconds_per_patch")}
    print(f"{'ratio':<16}{ratios['seconds_per_iteration']:>13.2f}x{ratios['peak_memory_mib']:>11.2f}x"
          f"{ratios['inference_seconds_per_patch']:>19.2f}x")
    summary = {"hardware": hardware, "results": results, "ratios": ratios}
    if args.selection_round:
        r = measure_selection_round(TRAINERS[args.trainer], plans, args.c, dataset_json, device)
        summary["selection_round"] = r
        print(f"selection round: {r['seconds_round']:.2f} s for {r['unlabeled_candidates']} unlabeled candidates "
              f"({r['seconds_round_per_unlabeled_case']:.3f} s per unlabeled case): {r['cases_encoded']} latent "
              f"representations at {r['seconds_per_encoded_case']:.3f} s/case, {r['selected']} pseudo-labels at "
              f"{r['seconds_per_pseudo_label']:.3f} s/case")
    if "refresh_seconds_per_case" in ssl:
        print(f"pseudo-label refresh: {ssl['refresh_seconds_per_case']:.3f} s per unlabeled case "
              f"({ssl['refresh_with_filter_seconds_per_case']:.3f} s with the mirrored second prediction of the "
              f"filter), {ssl['unlabeled_cases']} cases of {ssl['unlabeled_case_shape']} voxels")
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
