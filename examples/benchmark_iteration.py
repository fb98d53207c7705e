"""Time and peak memory of a training iteration of nnunet_ssl trainers against plain nnUNetTrainer, and their
inference cost.

All trainers are built from the same plans and configuration (same network, patch size and batch size) in one
process and fed identical synthetic batches (smooth random label blobs), so the figures compare the compute of
an iteration (forward, losses, backward, optimizer step, teacher update; mixed precision and torch.compile on
CUDA as nnU-Net does), not data loading, which runs in background workers. Trainers that draw unlabeled batches
get one of the labeled batch size (POPCORNTrainer draws none: its pairs are in the labeled batch);
LocalContrastiveTrainer is timed after its first pseudo-labels (its expensive phase). Iteration times are taken
in interleaved rounds (one iteration of every trainer per round, the median over rounds), so that a change of
machine load hits all trainers alike. Inference is timed in rounds too: one patch through the network in eval
mode (no deep supervision), and nnU-Net's sliding-window prediction of one whole preprocessed case
(``nnUNetPredictor`` with nnU-Net's defaults: step 0.5, Gaussian weighting, mirroring), as ``nnUNetv2_predict``
runs it.

    python examples/benchmark_iteration.py -d 990 -c 3d_fullres --trainer all [--iterations 10] [--rounds]
    python examples/benchmark_iteration.py -d 990 --trainer UGMCLTrainer MeanTeacherTrainer --hparams '{"mc_passes": 8}'

For trainers with signed distance targets (DTCTrainer, UGMCLTrainer), the cost of those targets in the
augmentation workers is measured on the dataset's own preprocessed cases: nnU-Net's augmentation of one labeled
batch with and without the signed distance transform (single-threaded, as in one worker). With ``--rounds``, the
pseudo-label rounds are timed on the dataset's real preprocessed cases (nnUNet_raw must be set: the unlabeled
images are checked and preprocessed first): one POPCORNTrainer selection round (latent representations, proximity
graph, pseudo-labels of the selected cases) and one LocalContrastiveTrainer refresh (plain and with the Table VII
filter's mirrored second prediction), per case.

Peak memory is CUDA's max_memory_allocated on a GPU; on a CPU it is measured in a fresh process per trainer: the
growth of the peak resident set size (VmHWM) over the resident size before the trainer was built (network,
optimizer, teacher, and the activations of the iterations).

FLOPs of one training iteration (torch's FLOP counter: matrix products and convolutions of the forward, losses and
backward) are counted for every trainer: their ratio is what a method costs on any hardware once the device is
saturated, the floor a measured time ratio tends to on a GPU. ``--flops-only`` prints just those (seconds on a CPU).
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

REFERENCE = "nnUNetTrainer 2x batch"


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
    if lm.has_regions:  # region channels, then the ignore channel and LocalContrastiveTrainer's outside channel
        extra = lm.has_ignore_label + hasattr(trainer, "outside_value")
        seg = np.concatenate([np.isin(labels, r if isinstance(r, (list, tuple)) else [r]) for r in
                              lm.foreground_regions] + [np.zeros_like(labels, dtype=bool)] * extra, 1)
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


def _full_resolution(target):
    return target[0] if isinstance(target, list) else target


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


class Bench:
    """One trainer with its synthetic batches."""

    def __init__(self, trainer_cls, plans: dict, configuration: str, dataset_json: dict, device: torch.device,
                 seed: int = 0, name: str | None = None):
        self.name = name or trainer_cls.__name__
        self.plans = plans
        self.device = device
        self.trainer = trainer_cls(plans={**deepcopy(plans), "continue_training": False},
                                   configuration=configuration, fold=0, dataset_json=dataset_json, device=device)
        self.trainer.initialize()
        self.trainer.network.train()
        rng = np.random.default_rng(seed)
        self.batches = [synthetic_batch(self.trainer, rng) for _ in range(4)]
        if getattr(self.trainer, "draws_unlabeled_batches", False):
            # the images (and, for self-training trainers, pseudo-labels) of the labeled batches, in another order
            # ``unlabeled_batch_size`` of them (the labeled batch repeated as needed)
            n = self.trainer.hparams["unlabeled_batch_size"] or self.trainer.batch_size
            reps = -(-n // self.trainer.batch_size)
            unlabeled = [{"data": b["data"].flip(0).repeat(reps, *[1] * (b["data"].dim() - 1))[:n],
                          "target": (t := _full_resolution(b["target"]).flip(0)).repeat(reps, *[1] * (t.dim() - 1))[:n]}
                         for b in self.batches]

            def cycle():
                while True:
                    yield from unlabeled

            self.trainer.dataloader_unlabeled = cycle()
        if hasattr(self.trainer, "pseudo_label_round"):
            self.trainer.pseudo_label_round = 1  # LocalContrastiveTrainer after its first pseudo-labels
        self.trainer.on_train_epoch_start()
        self.i = 0

    def step(self) -> float:
        start = time.perf_counter()
        self.trainer.train_step(self.batches[self.i % 4])
        _sync(self.device)
        self.i += 1
        return time.perf_counter() - start

    def step_flops(self) -> int:
        """Floating-point operations of one training iteration (forward, losses, backward; torch's FLOP counter
        counts matrix products and convolutions), on the uncompiled network: a compiled graph would bypass the
        counter."""
        from torch.utils.flop_counter import FlopCounterMode

        network = self.trainer.network
        self.trainer.network = getattr(network, "_orig_mod", network)
        try:
            with FlopCounterMode(display=False) as counter:
                self.step()
        finally:
            self.trainer.network = network
        return counter.get_total_flops()

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


def sliding_window_case(trainer) -> torch.Tensor:
    """The first preprocessed case of the configuration (or, without one, a synthetic image of twice the patch
    size), as nnUNetv2_predict hands it to the sliding-window prediction."""
    keys = trainer.dataset_class.get_identifiers(trainer.preprocessed_dataset_folder)
    if keys:
        data = trainer.dataset_class(trainer.preprocessed_dataset_folder, keys[:1]).load_case(keys[0])[0][:]
        return torch.from_numpy(np.ascontiguousarray(data)).float()
    shape = [2 * p for p in trainer.configuration_manager.patch_size]
    return torch.randn((trainer.num_input_channels, *shape), generator=torch.Generator().manual_seed(0))


def sliding_window_seconds(trainer, case: torch.Tensor) -> float:
    """nnU-Net's sliding-window prediction of ``case`` with the trainer's network, as nnUNetv2_predict runs it."""
    from nnunet_ssl.training.pseudo_labels import inference_mode, make_predictor

    if trainer.inference_allowed_mirroring_axes is None:  # set by on_train_start, which is not run here
        trainer.configure_rotation_dummyDA_mirroring_and_inital_patch_size()
    with inference_mode(trainer) as network:
        predictor = make_predictor(trainer, network, use_mirroring=True)
        _sync(trainer.device)
        start = time.perf_counter()
        predictor.predict_sliding_window_return_logits(case)
        _sync(trainer.device)
    return time.perf_counter() - start


def selection_round_seconds(trainer) -> dict:
    """One POPCORNTrainer selection round of a freshly initialised trainer on all unlabeled cases (the first round:
    the most candidates), with the trainer's default selection size."""
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


def refresh_seconds(trainer) -> dict:
    """Seconds per unlabeled case of one LocalContrastiveTrainer pseudo-label refresh (nnU-Net's sliding window on
    the preprocessed case, label map written to the fold folder), without and with the filter's mirrored second
    prediction."""
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


def _cpu_peak_child(trainer_name: str, plans: dict, configuration: str, dataset_json: dict, iterations: int,
                    queue) -> None:
    """In a fresh process: growth of the peak resident size over the size before the trainer was built (network,
    optimizer, teacher and the activations of ``iterations`` training iterations)."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    from nnunet_ssl.trainers import TRAINERS

    cls = TRAINERS.get(trainer_name, nnUNetTrainer)
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


def unlabeled_batch_size(bench: Bench) -> int:
    t = bench.trainer
    return (t.hparams["unlabeled_batch_size"] or t.batch_size) if getattr(t, "draws_unlabeled_batches", False) else 0


def print_flops(benches: list[Bench], flops: dict[str, int], dataset: str, configuration: str) -> None:
    base = benches[0]
    print(f"{dataset} {configuration}: patch {list(base.trainer.configuration_manager.patch_size)}, batch "
          f"{base.trainer.batch_size} labeled (+ the unlabeled batch in column 'unl.'); FLOPs of one training "
          f"iteration (forward, losses, backward)")
    print(f"{'trainer':<24}{'unl.':>5}{'GFLOP':>10}{'ratio':>8}")
    for b in benches:
        print(f"{b.name:<24}{unlabeled_batch_size(b):>5}{flops[b.name] / 1e9:>10.1f}"
              f"{flops[b.name] / flops[base.name]:>7.2f}x")


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
    parser.add_argument("--rounds", action="store_true", help="also time POPCORNTrainer's selection round and "
                        "LocalContrastiveTrainer's pseudo-label refresh on the dataset's cases (needs nnUNet_raw)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", help="also write the figures to this JSON file")
    parser.add_argument("--flops-only", action="store_true", help="only count the FLOPs of an iteration (the same on "
                        "every machine; seconds on a CPU), no timings, memory or rounds")
    parser.add_argument("--no-reference", action="store_true", help=f"leave out the row '{REFERENCE}' (plain "
                        "nnU-Net with the labeled batch doubled, i.e. the floor of a method that also trains on an "
                        "equally large unlabeled batch)")
    args = parser.parse_args()
    if args.hparams:
        os.environ["nnUNet_ssl_hparams"] = args.hparams
    if args.threads:
        torch.set_num_threads(args.threads)

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
    if not args.no_reference:  # nnU-Net on labeled + unlabeled batch: what the hardware charges for the extra patches
        doubled = deepcopy(plans)
        doubled["configurations"][args.c]["batch_size"] = 2 * benches[0].trainer.batch_size
        benches.insert(1, Bench(nnUNetTrainer, doubled, args.c, dataset_json, device, name=REFERENCE))
    flops = {b.name: b.step_flops() for b in benches}
    if args.flops_only:
        print_flops(benches, flops, name, args.c)
        return
    for b in benches:
        for _ in range(args.warmup):
            b.step()
    if device.type == "cuda":
        peaks = {b.name: b.peak_cuda_memory_mib(args.memory_iterations) for b in benches}
    else:
        peaks = {b.name: peak_cpu_memory_mib(b.name, b.plans, args.c, dataset_json, args.memory_iterations)
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
    case = sliding_window_case(benches[0].trainer)
    prediction: dict[str, list[float]] = {b.name: [] for b in benches}
    for r in range(3):
        for b in benches:
            seconds = sliding_window_seconds(b.trainer, case)
            if r > 0:
                prediction[b.name].append(seconds)
    results = []
    for b in benches:
        results.append({"trainer": b.name, "seconds_per_iteration": statistics.median(times[b.name]),
                        "gflop_per_iteration": flops[b.name] / 1e9,
                        "peak_memory_mib": peaks[b.name],
                        "inference_seconds_per_patch": statistics.median(inference[b.name]),
                        "prediction_seconds_per_case": statistics.median(prediction[b.name]),
                        "batch_size": b.trainer.batch_size, "unlabeled_batch_size": unlabeled_batch_size(b),
                        "patch_size": list(b.trainer.configuration_manager.patch_size)})
    base = results[0]
    for r in results[1:]:
        r["ratios"] = {k: r[k] / base[k] for k in ("seconds_per_iteration", "gflop_per_iteration", "peak_memory_mib",
                                                   "inference_seconds_per_patch", "prediction_seconds_per_case")}
    hardware = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"CPU, {torch.get_num_threads()} threads"
    print(f"{name} {args.c}: patch {base['patch_size']}, batch {base['batch_size']} labeled (+ the unlabeled batch "
          f"in column 'unl.'), prediction of a case of {list(case.shape[1:])} voxels, {hardware}, "
          f"torch {torch.__version__}")
    print(f"{'trainer':<24}{'unl.':>5}{'s/iteration':>12}{'peak MiB':>10}{'s/patch':>9}{'s/case':>8}"
          f"{'time':>8}{'FLOPs':>8}{'memory':>8}{'patch':>7}{'case':>7}")
    for r in results:
        ratio = r.get("ratios")
        tail = "" if ratio is None else (f"{ratio['seconds_per_iteration']:>7.2f}x"
                                         f"{ratio['gflop_per_iteration']:>7.2f}x{ratio['peak_memory_mib']:>7.2f}x"
                                         f"{ratio['inference_seconds_per_patch']:>6.2f}x"
                                         f"{ratio['prediction_seconds_per_case']:>6.2f}x")
        print(f"{r['trainer']:<24}{r['unlabeled_batch_size']:>5}{r['seconds_per_iteration']:>12.3f}"
              f"{r['peak_memory_mib']:>10.0f}{r['inference_seconds_per_patch']:>9.4f}"
              f"{r['prediction_seconds_per_case']:>8.2f}{tail}")
    report = {"hardware": hardware, "hparams": args.hparams, "results": results, "augmentation": None}
    for b in benches if args.rounds else ():
        if hasattr(b.trainer, "selection_round"):
            report["selection_round"] = r = selection_round_seconds(b.trainer)
            print(f"{b.name} selection round: {r['seconds_round']:.2f} s for {r['unlabeled_candidates']} unlabeled "
                  f"candidates ({r['seconds_round_per_unlabeled_case']:.3f} s per unlabeled case): "
                  f"{r['cases_encoded']} latent representations at {r['seconds_per_encoded_case']:.3f} s/case, "
                  f"{r['selected']} pseudo-labels at {r['seconds_per_pseudo_label']:.3f} s/case")
        if hasattr(b.trainer, "refresh_pseudo_labels"):
            report["refresh"] = r = refresh_seconds(b.trainer)
            print(f"{b.name} pseudo-label refresh: {r['refresh_seconds_per_case']:.3f} s per unlabeled case "
                  f"({r['refresh_with_filter_seconds_per_case']:.3f} s with the filter's mirrored second "
                  f"prediction), {r['unlabeled_cases']} cases of {r['unlabeled_case_shape']} voxels")
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
