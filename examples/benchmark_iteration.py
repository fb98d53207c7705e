"""Time and peak memory of one training iteration of nnunet_ssl trainers against plain nnUNetTrainer.

All trainers are built from the same plans and configuration (same network, patch size and batch size) in one
process and fed identical synthetic batches (smooth random label blobs), so the figures compare the compute of
an iteration (forward, losses, backward, optimizer step, teacher update; mixed precision and torch.compile on
CUDA as nnU-Net does), not data loading, which runs in background workers. Semi-supervised trainers also draw
an unlabeled batch of the labeled batch size. Iteration times are taken in interleaved rounds (one iteration of
every trainer per round, the median over rounds), so that a change of machine load hits all trainers alike.
Inference (one patch through the network in eval mode, no deep supervision) is timed in rounds too.

For trainers with signed distance targets (DTCTrainer, UGMCLTrainer), the cost of those targets in the
augmentation workers is measured on the dataset's own preprocessed cases: nnU-Net's augmentation of one labeled
batch with and without the signed distance transform (single-threaded, as in one worker).

    python examples/benchmark_iteration.py -d 990 -c 3d_fullres --trainer UGMCLTrainer MeanTeacherTrainer
        [--iterations 10] [--hparams '{"mc_passes": 8}']

Peak memory is CUDA's max_memory_allocated on a GPU; on a CPU it is measured in a fresh process per trainer: the
growth of the peak resident set size (VmHWM) over the resident size before the trainer was built (network,
optimizer, teacher, and the activations of the iterations).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import tempfile
import time
from copy import deepcopy
from pathlib import Path

import numpy as np
import torch
from scipy.ndimage import gaussian_filter


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # Linux: resets VmHWM to the current resident size


def _blob_labels(shape, num_labels: int, rng: np.random.Generator) -> np.ndarray:
    """Smooth random structures: thresholds of a Gaussian-filtered noise field (label 0 .. num_labels - 1)."""
    field = gaussian_filter(rng.standard_normal(shape), sigma=max(2.0, min(shape) / 8))
    cuts = np.quantile(field, np.linspace(0, 1, num_labels + 1)[1:-1] * 0.5 + 0.5)  # background ~ half
    return np.digitize(field, cuts).astype(np.int16)


def synthetic_batch(trainer, rng: np.random.Generator) -> dict:
    cm, lm = trainer.configuration_manager, trainer.label_manager
    shape = (trainer.batch_size, trainer.num_input_channels, *cm.patch_size)
    data = torch.from_numpy(rng.standard_normal(shape).astype(np.float32))
    labels = np.stack([_blob_labels(cm.patch_size, len(lm.all_labels), rng)[None] for _ in range(trainer.batch_size)])
    if lm.has_regions:
        seg = np.concatenate([np.isin(labels, r if isinstance(r, (list, tuple)) else [r]) for r in
                              lm.foreground_regions], 1)
    else:
        seg = labels
    full = torch.from_numpy(seg)
    scales = trainer._get_deep_supervision_scales() or [[1.0] * len(cm.patch_size)]
    targets = []
    for s in scales:
        size = [round(p * f) for p, f in zip(cm.patch_size, s)]
        targets.append(torch.nn.functional.interpolate(full.float(), size, mode="nearest-exact").to(full.dtype))
    targets = targets if trainer.enable_deep_supervision else targets[0]
    if hasattr(trainer, "signed_distance_transform"):  # as the labeled pipeline appends them
        sdt = trainer.signed_distance_transform()
        sdf = torch.stack([sdt(segmentation=full[b])["segmentation"][-1] for b in range(trainer.batch_size)])
        targets = [*targets, sdf] if isinstance(targets, list) else [targets, sdf]
    return {"data": data, "target": targets}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


class Bench:
    """One trainer with its synthetic batches."""

    def __init__(self, trainer_cls, plans: dict, configuration: str, dataset_json: dict, device: torch.device,
                 seed: int = 0):
        self.name = trainer_cls.__name__
        self.device = device
        self.trainer = trainer_cls(plans={**deepcopy(plans), "continue_training": False},
                                   configuration=configuration, fold=0, dataset_json=dataset_json, device=device)
        self.trainer.initialize()
        self.trainer.network.train()
        rng = np.random.default_rng(seed)
        self.batches = [synthetic_batch(self.trainer, rng) for _ in range(4)]
        if hasattr(self.trainer, "dataloader_unlabeled"):
            unlabeled = [{"data": b["data"].flip(0)} for b in self.batches]

            def cycle():
                while True:
                    yield from unlabeled

            self.trainer.dataloader_unlabeled = cycle()
        self.trainer.on_train_epoch_start()
        self.i = 0

    def step(self) -> float:
        start = time.perf_counter()
        self.trainer.train_step(self.batches[self.i % 4])
        _sync(self.device)
        self.i += 1
        return time.perf_counter() - start

    def peak_cuda_memory_mib(self, iterations: int) -> float:
        _sync(self.device)
        torch.cuda.reset_peak_memory_stats()
        for _ in range(iterations):
            self.step()
        return torch.cuda.max_memory_allocated() / 2**20

    def inference_seconds(self) -> float:
        """One forward pass of one patch in eval mode without deep supervision (what the predictor runs)."""
        t = self.trainer
        t.set_deep_supervision_enabled(False)
        t.network.eval()
        x = self.batches[0]["data"][:1].to(self.device)
        with torch.no_grad(), torch.autocast(self.device.type, enabled=self.device.type == "cuda"):
            _sync(self.device)
            start = time.perf_counter()
            t.network(x)
            _sync(self.device)
        t.set_deep_supervision_enabled(t.enable_deep_supervision)
        t.network.train()
        return time.perf_counter() - start


def _cpu_peak_child(trainer_name: str, plans: dict, configuration: str, dataset_json: dict, iterations: int,
                    queue) -> None:
    """In a fresh process: growth of the peak resident size over the size before the trainer was built (network,
    optimizer, teacher and the activations of ``iterations`` training iterations)."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    from nnunet_ssl.trainers import TRAINERS

    cls = nnUNetTrainer if trainer_name == "nnUNetTrainer" else TRAINERS[trainer_name]
    base = _rss_kib("VmRSS")
    _reset_peak_rss()
    bench = Bench(cls, plans, configuration, dataset_json, torch.device("cpu"))
    for _ in range(iterations):
        bench.step()
    queue.put((_rss_kib("VmHWM") - base) / 1024)


def peak_cpu_memory_mib(trainer_name: str, plans: dict, configuration: str, dataset_json: dict,
                        iterations: int) -> float:
    # one process per trainer: in a shared process the allocator reuses what an earlier trainer freed
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_cpu_peak_child, args=(trainer_name, plans, configuration, dataset_json, iterations,
                                                      queue))
    proc.start()
    peak = queue.get()
    proc.join()
    return peak


def augmentation_cost(trainer, batches: int = 8) -> dict:
    """nnU-Net's augmentation of labeled batches from the preprocessed cases, without and with the signed
    distance transform appended (one process, one thread: what one augmentation worker does)."""
    from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from threadpoolctl import threadpool_limits

    lm, cm = trainer.label_manager, trainer.configuration_manager
    rotation, dummy_2d, initial_patch_size, mirror_axes = \
        trainer.configure_rotation_dummyDA_mirroring_and_inital_patch_size()
    folder = trainer.preprocessed_dataset_folder
    dataset_tr = infer_dataset_class(folder)(folder)  # every labeled case
    figures = {}
    for with_sdf in (False, True):
        transforms = nnUNetTrainer.get_training_transforms(  # nnU-Net's own pipeline
            cm.patch_size, rotation, trainer._get_deep_supervision_scales(), mirror_axes, dummy_2d,
            use_mask_for_norm=cm.use_mask_for_norm, is_cascaded=False, foreground_labels=lm.foreground_labels,
            regions=lm.foreground_regions if lm.has_regions else None, ignore_label=lm.ignore_label)
        if with_sdf:
            transforms.transforms.append(trainer.signed_distance_transform())
        dl = nnUNetDataLoader(dataset_tr, trainer.batch_size, initial_patch_size, cm.patch_size, lm,
                              oversample_foreground_percent=trainer.oversample_foreground_percent, transforms=transforms)
        np.random.seed(0)
        torch.manual_seed(0)
        with threadpool_limits(1):
            dl.generate_train_batch()  # warm-up (file handles, caches)
            times = []
            for _ in range(batches):
                start = time.perf_counter()
                dl.generate_train_batch()
                times.append(time.perf_counter() - start)
        figures["with_sdf" if with_sdf else "without_sdf"] = statistics.median(times)
    sdt = trainer.signed_distance_transform()
    seg = dl.generate_train_batch()["target"][0]  # full-resolution targets
    with threadpool_limits(1):
        start = time.perf_counter()
        for b in range(seg.shape[0]):
            sdt(segmentation=seg[b])
    figures["sdf_seconds_per_patch"] = (time.perf_counter() - start) / seg.shape[0]
    figures["seconds_per_batch_ratio"] = figures["with_sdf"] / figures["without_sdf"]
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-d", required=True, help="dataset name or id (planned with nnUNetv2_plan_and_preprocess)")
    parser.add_argument("-c", default="3d_fullres", help="configuration (default 3d_fullres)")
    parser.add_argument("-p", default="nnUNetPlans", help="plans identifier")
    parser.add_argument("--trainer", nargs="+", default=["MuSTTrainer"],
                        help="nnunet_ssl trainer(s) to compare (default MuSTTrainer; 'all' for every one)")
    parser.add_argument("--iterations", type=int, default=10, help="timed rounds (one iteration per trainer each)")
    parser.add_argument("--memory-iterations", type=int, default=2, help="iterations per trainer for peak memory")
    parser.add_argument("--warmup", type=int, default=2, help="untimed iterations first (torch.compile, caches)")
    parser.add_argument("--sdf-patch", type=int, nargs="+", help="also time the signed distance transform on "
                        "synthetic label patches of this size (e.g. 128 128 128)")
    parser.add_argument("--hparams", help="nnUNet_ssl_hparams for the nnunet_ssl trainers (JSON object)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", help="also write the figures to this JSON file")
    args = parser.parse_args()
    if args.hparams:
        os.environ["nnUNet_ssl_hparams"] = args.hparams

    from nnunetv2.paths import nnUNet_preprocessed
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    from nnunet_ssl.trainers import TRAINERS
    from nnunet_ssl.training.distance import SignedDistanceTransform

    names = [n for n in TRAINERS if n != "SupervisedTrainer"] if args.trainer == ["all"] else args.trainer
    name = maybe_convert_to_dataset_name(args.d)
    pp = Path(nnUNet_preprocessed.require()) / name
    plans = json.loads((pp / f"{args.p}.json").read_text())
    dataset_json = json.loads((pp / "dataset.json").read_text())
    device = torch.device(args.device)
    os.environ["nnUNet_results"] = tempfile.mkdtemp(prefix="nnunet_ssl_benchmark_")  # trainers create folders

    benches = [Bench(cls, plans, args.c, dataset_json, device) for cls in
               (nnUNetTrainer, *(TRAINERS[n] for n in names))]
    for b in benches:
        for _ in range(args.warmup):
            b.step()
    if device.type == "cuda":
        peaks = {b.name: b.peak_cuda_memory_mib(args.memory_iterations) for b in benches}
    else:
        peaks = {b.name: peak_cpu_memory_mib(b.name, plans, args.c, dataset_json, args.memory_iterations)
                 for b in benches}
    times: dict[str, list[float]] = {b.name: [] for b in benches}
    for _ in range(args.iterations):
        for b in benches:
            times[b.name].append(b.step())
    inference: dict[str, list[float]] = {b.name: [] for b in benches}
    for r in range(args.iterations + 1):
        for b in benches:
            seconds = b.inference_seconds()
            if r > 0:  # the first round warms up
                inference[b.name].append(seconds)
    results = []
    for b in benches:
        results.append({"trainer": b.name, "seconds_per_iteration": statistics.median(times[b.name]),
                        "peak_memory_mib": peaks[b.name],
                        "inference_seconds_per_patch": statistics.median(inference[b.name]),
                        "batch_size": b.trainer.batch_size,
                        "patch_size": list(b.trainer.configuration_manager.patch_size)})
    base = results[0]
    for r in results[1:]:
        r["ratios"] = {k: r[k] / base[k] for k in ("seconds_per_iteration", "peak_memory_mib",
                                                   "inference_seconds_per_patch")}
    hardware = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"CPU, {torch.get_num_threads()} threads"
    print(f"{name} {args.c}: patch {base['patch_size']}, batch {base['batch_size']} labeled (+ as many unlabeled "
          f"for the semi-supervised trainers), {hardware}, torch {torch.__version__}")
    print(f"{'trainer':<22}{'s/iteration':>13}{'peak MiB':>11}{'inference s/patch':>19}"
          f"{'time':>9}{'memory':>9}{'inference':>11}")
    for r in results:
        ratio = r.get("ratios")
        tail = "" if ratio is None else (f"{ratio['seconds_per_iteration']:>8.2f}x{ratio['peak_memory_mib']:>8.2f}x"
                                         f"{ratio['inference_seconds_per_patch']:>10.2f}x")
        print(f"{r['trainer']:<22}{r['seconds_per_iteration']:>13.3f}{r['peak_memory_mib']:>11.0f}"
              f"{r['inference_seconds_per_patch']:>19.4f}{tail}")
    report = {"hardware": hardware, "hparams": args.hparams, "results": results, "augmentation": None}
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    sdf_bench = next((b for b in benches if hasattr(b.trainer, "signed_distance_transform")), None)
    if sdf_bench is not None:
        report["augmentation"] = augmentation = augmentation_cost(sdf_bench.trainer)
        print(f"signed distance targets ({sdf_bench.name}): {augmentation['sdf_seconds_per_patch']:.3f} s per patch; "
              f"nnU-Net's augmentation of a labeled batch {augmentation['without_sdf']:.3f} s, with the targets "
              f"{augmentation['with_sdf']:.3f} s ({augmentation['seconds_per_batch_ratio']:.2f}x), one worker")
        if args.sdf_patch:
            rng = np.random.default_rng(0)
            lm = sdf_bench.trainer.label_manager
            labels = torch.from_numpy(_blob_labels(args.sdf_patch, len(lm.all_labels), rng)[None])
            sdt = SignedDistanceTransform(lm.all_labels, None, None)
            start = time.perf_counter()
            sdt(segmentation=labels)
            report["sdf_seconds_synthetic_patch"] = seconds = time.perf_counter() - start
            print(f"signed distance targets of a {'x'.join(map(str, args.sdf_patch))} patch with "
                  f"{len(lm.all_labels)} classes: {seconds:.3f} s")
        if args.json:
            Path(args.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
