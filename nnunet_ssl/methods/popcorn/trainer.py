"""``POPCORNTrainer``: progressive pseudo-labeling with consistency regularization and neighboring (POPCORN).

Training (section 2.2): nnU-Net's batches hold pairs of patches (``sampling.PairedDataLoader``); the loss is
nnU-Net's Dice + CE with deep supervision plus alpha times the bottleneck consistency of the pairs (eq. 2-5).

Data selection (sections 2.3-2.4): the first ``first_step_epochs`` epochs train on the labeled cases; then, every
``epochs_per_round`` epochs, a selection round computes the latent representation of every training case
(labeled and pseudo-labeled) and every remaining unlabeled case (the bottleneck features over nnU-Net's
sliding-window tiles, averaged), scores each unlabeled case by the sum of its p smallest distances to the training
set (eq. 6-7), pseudo-labels the K lowest-scoring ones (``selection`` 'random': K at random, the paper's ablation)
with nnU-Net's predictor and adds them to the training set (a ``CombinedDataset`` read by nnU-Net's loader), until
every unlabeled case is in.

State: the rounds (epoch, cases in the order selected, their scores) go into the checkpoint's ``nnunet_ssl`` entry
and into ``popcorn_state.json`` in the fold folder; the pseudo-labels are ``popcorn_pseudo_labels/{case}_seg.b2nd``
(the preprocessed image's shape). Files are written before the state names them, each atomically.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from batchgenerators.dataloading.multi_threaded_augmenter import MultiThreadedAugmenter
from batchgenerators.dataloading.nondet_multi_threaded_augmenter import NonDetMultiThreadedAugmenter
from batchgenerators.dataloading.single_threaded_augmenter import SingleThreadedAugmenter
from batchgenerators.utilities.file_and_folder_operations import join, maybe_mkdir_p
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.default_n_proc_DA import get_allowed_n_proc_DA
from nnunetv2.utilities.helpers import dummy_context
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager
from torch import distributed as dist
from torch import nn

from nnunet_ssl.data.loader import UnlabeledDataset
from nnunet_ssl.data.unlabeled import write_json_atomic
from nnunet_ssl.methods.popcorn.losses import bottleneck_consistency_loss, pair_similarity, popcorn_objective
from nnunet_ssl.methods.popcorn.network import POPCORNNetwork
from nnunet_ssl.methods.popcorn.sampling import PairedDataLoader
from nnunet_ssl.methods.popcorn.selection import (
    Schedule,
    ScheduleError,
    derive_schedule,
    proximity_matrix,
    proximity_scores,
    select_closest,
    select_random,
)
from nnunet_ssl.training.base import UNLABELED_HPARAMS, SemiSupervisedTrainer
from nnunet_ssl.training.hparams import HParam, HParamError
from nnunet_ssl.training.pseudo_labels import (
    PROPERTIES_SUFFIX,
    SEG_SUFFIX,
    CombinedDataset,
    PseudoLabeledDataset,
    PseudoLabelStore,
    inference_mode,
    label_shares,
    make_predictor,
    predict_pseudo_labels,
    sliding_window_tiles,
    underrepresented_labels,
)
from nnunet_ssl.training.supervised import CUDA

STATE_FILE = "popcorn_state.json"
# Tiles for the latent representations: nnU-Net's tiling with step 1 (tiles overlap only where the image size is
# not a multiple of the patch size) covers every voxel about equally often, with ~1/8 of the tiles of a
# prediction (step 0.5) in 3d; the Gaussian blending that step 0.5 serves is not needed for an average.
REPRESENTATION_TILE_STEP = 1.0
PSEUDO_LABEL_FOLDER = "popcorn_pseudo_labels"

POPCORN_HPARAMS: dict[str, HParam] = {
    **UNLABELED_HPARAMS,
    "alpha": HParam(0.2, float, "Weight alpha of the bottleneck consistency L_reg (eq. 5).", low=0.0),
    "same_patch_probability": HParam(0.5, float, "Probability that a pair is two augmentations of one patch; "
                                                 "otherwise patches of two cases at the same relative position.",
                                     low=0.0, high=1.0),
    "first_step_epochs": HParam(None, int, "E1: epochs on the labeled cases before the first selection round; "
                                           "null: max(1, round(num_epochs / 2)).", low=1, optional=True),
    "selection_size": HParam(None, int, "K: unlabeled cases pseudo-labeled per round (eq. 7); null: "
                                        "ceil(M / min(15, M, num_epochs - E1)) for M unlabeled cases.",
                             low=1, optional=True),
    "epochs_per_round": HParam(None, int, "N: epochs between selection rounds; null: "
                                          "floor((num_epochs - E1) / ceil(M / K)).", low=1, optional=True),
    "selection": HParam("proximity", str, "How a round picks its K cases: 'proximity', the K closest to the training "
                                          "set in latent space (eq. 6-7); 'random', K of the remaining cases at "
                                          "random, drawn from seed and round number (the paper's ablation without "
                                          "proximity graph, section 4.1).", choices=("proximity", "random")),
    "num_neighbors": HParam(5, int, "p: nearest training cases whose distances make a case's score (eq. 7).",
                            low=1),
    "pseudo_label_mirroring": HParam(False, bool, "Predict pseudo-labels with nnU-Net's mirroring test-time "
                                                  "augmentation (up to 8x slower in 3d)."),
    "pseudo_label_alignment": HParam(False, bool, "Not in the paper: before the argmax, offset each pseudo-label's "
                                                  "logits so that its foreground labels take the labeled cases' "
                                                  "shares of its foreground (distribution alignment, ReMixMatch); "
                                                  "not for region-based labels."),
}


def _finish(augmenter) -> None:
    if isinstance(augmenter, (NonDetMultiThreadedAugmenter, MultiThreadedAugmenter)):
        augmenter._finish()


class POPCORNTrainer(SemiSupervisedTrainer):
    hparam_spec: ClassVar[dict[str, HParam]] = POPCORN_HPARAMS
    extra_log_keys: ClassVar[tuple[str, ...]] = ("loss_segmentation", "loss_regularization", "pair_similarity")
    draws_unlabeled_batches: ClassVar[bool] = False  # it trains on labeled + pseudo-labeled batches
    # its unlabeled images enter as pseudo-labeled training cases, not through a weighted loss: no placebo
    unsupervised_weights: ClassVar[tuple[str, ...]] = ()

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = CUDA):
        super().__init__(plans, configuration, fold, dataset_json, device)
        h = self.hparams
        if h["first_step_epochs"] is not None and h["first_step_epochs"] >= h["num_epochs"]:
            raise HParamError(f"first_step_epochs = {h['first_step_epochs']} must be below num_epochs = "
                              f"{h['num_epochs']} (at least one epoch trains with pseudo-labels); lower it in "
                              f"nnUNet_ssl_hparams or set it to null.")
        if h["pseudo_label_alignment"] and self.label_manager.has_regions:
            raise HParamError("pseudo_label_alignment = true needs mutually exclusive labels, but this dataset's "
                              "labels are regions (they overlap); set it to false in nnUNet_ssl_hparams.")
        self.store = PseudoLabelStore(join(self.output_folder, PSEUDO_LABEL_FOLDER))
        self.schedule: Schedule | None = None
        self.rounds: list[dict[str, Any]] = []
        self._restored: dict[str, Any] | None = None

    @staticmethod
    def build_network_architecture(plans_manager: PlansManager, configuration_manager: ConfigurationManager,
                                   num_input_channels: int, num_output_channels: int,
                                   enable_deep_supervision: bool = True) -> nn.Module:
        return POPCORNNetwork(nnUNetTrainer.build_network_architecture(
            plans_manager, configuration_manager, num_input_channels, num_output_channels, enable_deep_supervision))

    def initialize(self):
        super().initialize()
        if self.batch_size < 2:
            raise ValueError(
                f"POPCORNTrainer forms pairs of patches inside each batch (bottleneck consistency, eq. 2) and needs "
                f"a batch size >= 2 per GPU; configuration '{self.configuration_name}' gives {self.batch_size}"
                f"{' on this GPU' if self.is_ddp else ''}. Raise batch_size in the plans or use fewer GPUs.")

    # ---------------------------------------------------------------- the iteration (eq. 2-5)
    def compute_losses(self, data, target, data_unlabeled=None):
        output, bottleneck = self.network(data, return_bottleneck=True)
        segmentation = self.loss(output, target)
        lm = self.label_manager
        similarity = pair_similarity(target[0] if isinstance(target, list) else target,
                                     lm.num_segmentation_heads, lm.has_regions, lm.ignore_label)
        regularization = bottleneck_consistency_loss(bottleneck, similarity)
        return {
            "loss": popcorn_objective(segmentation, regularization, self.hparams["alpha"]),
            "loss_segmentation": segmentation,
            "loss_regularization": regularization,
            "pair_similarity": similarity.mean(),
        }

    # ---------------------------------------------------------------- training set and its loader
    def pseudo_labeled_cases(self) -> list[str]:
        """The unlabeled cases in the training set, in the order they were selected."""
        return [c for r in self.rounds for c in r["selected"]]

    def get_tr_and_val_datasets(self):
        dataset_tr, dataset_val = super().get_tr_and_val_datasets()
        cases = self.pseudo_labeled_cases()
        if cases:
            dataset_tr = CombinedDataset([dataset_tr, PseudoLabeledDataset(self.unlabeled_folder(), self.store,
                                                                            cases)])
        return dataset_tr, dataset_val

    def get_dataloaders(self):
        train, val = super().get_dataloaders()  # nnU-Net's validation loader; its training loader is replaced
        _finish(train)
        return self.get_paired_training_dataloader(), val

    def get_paired_training_dataloader(self):
        """nnU-Net's training loader (same transforms, patch sizes, oversampling and workers) on
        ``get_tr_and_val_datasets()``, with batches of pairs."""
        rotation, dummy_2d, initial_patch_size, mirror_axes = \
            self.configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        lm = self.label_manager
        patch_size = self.configuration_manager.patch_size
        transforms = self.get_training_transforms(
            patch_size, rotation, self._get_deep_supervision_scales(), mirror_axes, dummy_2d,
            use_mask_for_norm=self.configuration_manager.use_mask_for_norm, is_cascaded=False,
            foreground_labels=lm.foreground_labels, regions=lm.foreground_regions if lm.has_regions else None,
            ignore_label=lm.ignore_label)
        dataset_tr, _ = self.get_tr_and_val_datasets()
        dl = PairedDataLoader(dataset_tr, self.batch_size, initial_patch_size, patch_size, lm,
                              oversample_foreground_percent=self.oversample_foreground_percent,
                              sampling_probabilities=None, pad_sides=None, transforms=transforms,
                              probabilistic_oversampling=self.probabilistic_oversampling,
                              same_patch_probability=self.hparams["same_patch_probability"])
        n_proc = get_allowed_n_proc_DA()
        if n_proc == 0:
            return SingleThreadedAugmenter(dl, None)
        return NonDetMultiThreadedAugmenter(dl, None, n_proc, max(6, n_proc // 2), None,
                                            pin_memory=self.device.type == "cuda", wait_time=0.002)

    def restart_training_dataloader(self) -> None:
        """A new training loader on the grown training set (the old one's workers hold the old case list)."""
        old, self.dataloader_train = self.dataloader_train, None
        _finish(old)
        self.dataloader_train = self.get_paired_training_dataloader()

    # ---------------------------------------------------------------- schedule and state
    def prepare_unlabeled_data(self) -> list[str]:
        cases = super().prepare_unlabeled_data()
        h = self.hparams
        restored = self._restored or {}
        saved = restored["schedule"] if restored.get("rounds") else None
        if saved is not None and restored["unlabeled_cases"] != cases:
            raise HParamError(
                f"the checkpoint's POPCORN rounds were selected among {len(restored['unlabeled_cases'])} "
                f"unlabeled case(s), but {len(cases)} are there now (the unlabeled images changed). Resume with "
                f"the checkpoint's unlabeled images or start a new training (without --c).")
        # a run resumes with the schedule it started with: values left null are the checkpoint's (derived by the
        # defaults of the version that started it), values set in nnUNet_ssl_hparams must agree with it
        keys = ("selection_size", "epochs_per_round", "first_step_epochs")
        values = [saved[k] if saved is not None and h[k] is None else h[k] for k in keys]
        try:
            self.schedule = derive_schedule(len(cases), self.num_epochs, *values, h["num_neighbors"])
        except ScheduleError as e:
            raise HParamError(str(e)) from None
        if saved is not None:
            if saved != self.schedule.as_dict():
                raise HParamError(f"the checkpoint's POPCORN schedule {saved} differs from {self.schedule.as_dict()} "
                                  f"(num_epochs or a value set in nnUNet_ssl_hparams changed); resume with the "
                                  f"checkpoint's values or start a new training (without --c).")
            self.rounds = [dict(r) for r in restored["rounds"]]
            self.print_to_log_file(f"POPCORN resumes with the checkpoint's schedule (first_step_epochs "
                                   f"{self.schedule.first_step_epochs}, selection_size {self.schedule.selection_size}, "
                                   f"epochs_per_round {self.schedule.epochs_per_round}).")
        self.unlabeled_identifiers = cases
        self.reconcile_pseudo_labels()
        self.print_to_log_file(f"POPCORN schedule: {self.schedule.as_dict()}; {len(self.pseudo_labeled_cases())} "
                               f"case(s) pseudo-labeled so far.")
        return cases

    def reconcile_pseudo_labels(self) -> None:
        """Make the pseudo-label folder match the rounds in force: files of cases the state does not name (a run
        stopped after a round but before its checkpoint, or an earlier training in this folder) and temporary
        files of interrupted writes are deleted; a named case without its files is predicted again."""
        named = set(self.pseudo_labeled_cases())
        if self.local_rank == 0:
            maybe_mkdir_p(str(self.store.folder))
            for f in self.store.folder.iterdir():
                case = next((f.name[: -len(suffix)] for suffix in (SEG_SUFFIX, PROPERTIES_SUFFIX)
                             if f.name.endswith(suffix)), None)
                interrupted_write = f.name.startswith(".") and f.name.endswith(".tmp")
                if interrupted_write or (case is not None and case not in named):
                    f.unlink()
        if self.is_ddp:
            dist.barrier()
        missing = [c for c in self.pseudo_labeled_cases() if not self.store.has(c)]
        if missing:
            self.print_to_log_file(f"POPCORN: pseudo-label files of {missing} are missing; predicting them again "
                                   f"with the current model.")
            self.predict_pseudo_labels(missing)
        self.write_state_log()

    def popcorn_state(self) -> dict[str, Any]:
        return {
            "schedule": self.schedule.as_dict() if self.schedule is not None else None,
            "unlabeled_cases": list(self.unlabeled_identifiers),
            "rounds": [dict(r) for r in self.rounds],
        }

    def extra_checkpoint_state(self) -> dict[str, Any]:
        return {**super().extra_checkpoint_state(), "popcorn": self.popcorn_state()}

    def load_extra_checkpoint_state(self, state: dict[str, Any]) -> None:
        super().load_extra_checkpoint_state(state)
        self._restored = state.get("popcorn")
        if self._restored is not None:  # the same rounds before on_train_start (e.g. --val) as after
            self.rounds = [dict(r) for r in self._restored["rounds"]]

    def write_state_log(self) -> None:
        """``popcorn_state.json`` in the fold folder: the schedule, every round with its cases in the order
        selected, their scores and pseudo-label files, and what is left."""
        if self.local_rank != 0:
            return
        folder = Path(self.output_folder)
        selected = self.pseudo_labeled_cases()
        rounds = [{**{k: v for k, v in r.items() if k not in ("selected", "scores")},
                   "selected": [{"case": c, "score": s, "pseudo_label": str(self.store.seg_file(c).relative_to(folder))}
                                for c, s in zip(r["selected"], r["scores"])]} for r in self.rounds]
        write_json_atomic({
            "trainer": type(self).__name__,
            "schedule": self.schedule.as_dict() if self.schedule is not None else None,
            "labeled_cases": len(self.do_split()[0]),
            "unlabeled_cases": len(self.unlabeled_identifiers),
            "rounds": rounds,
            "pseudo_labeled": selected,
            "remaining": len(self.unlabeled_identifiers) - len(selected),
        }, join(self.output_folder, STATE_FILE))

    # ---------------------------------------------------------------- selection rounds (sections 2.3-2.4)
    def on_train_epoch_start(self):
        super().on_train_epoch_start()
        s = self.schedule
        while s is not None and len(self.rounds) < s.num_rounds and self.current_epoch >= s.round_epoch(
                len(self.rounds) + 1):
            self.selection_round()

    def unlabeled_images(self) -> UnlabeledDataset:
        return UnlabeledDataset(str(self.unlabeled_folder()), self.unlabeled_identifiers)

    @torch.no_grad()
    def latent_representations(self, labeled: list[str], unlabeled: list[str]) -> dict[str, np.ndarray]:
        """h of each whole preprocessed image: the bottleneck feature maps of nnU-Net's sliding-window tiles
        (``REPRESENTATION_TILE_STEP``, no mirroring), averaged over tiles and positions (one vector of bottleneck
        channels per case).
        Under DDP each rank encodes every world-size-th case and the results are gathered."""
        rank, world = (self.local_rank, dist.get_world_size()) if self.is_ddp else (0, 1)
        jobs = [(c, True) for c in labeled] + [(c, False) for c in unlabeled]
        datasets = {True: self.labeled_images(), False: self.unlabeled_images()}
        reps: dict[str, np.ndarray] = {}
        with inference_mode(self) as network:
            predictor = make_predictor(self, network, tile_step_size=REPRESENTATION_TILE_STEP)
            encoder = self.unwrapped_network()
            autocast = torch.autocast(self.device.type) if self.device.type == "cuda" else dummy_context()
            for case, is_labeled in jobs[rank::world]:
                data = datasets[is_labeled].load_case(case)[0]
                image = torch.from_numpy(np.ascontiguousarray(data[:], dtype=np.float32)).to(self.device)
                total, count = None, 0
                for tiles in sliding_window_tiles(predictor, image, self.batch_size):
                    with autocast:
                        h = encoder.bottleneck(tiles)
                    h = h.float().flatten(2)
                    part = h.sum((0, 2))
                    total = part if total is None else total + part
                    count += h.shape[0] * h.shape[2]
                reps[case] = (total / count).cpu().numpy()
        if self.is_ddp:
            gathered: list[Any] = [None] * world
            dist.all_gather_object(gathered, reps)
            reps = {k: v for part in gathered for k, v in part.items()}
        return reps

    def predict_pseudo_labels(self, cases: list[str]) -> dict[str, dict]:
        """Predict and store the cases' pseudo-labels; with ``pseudo_label_alignment``, returns each case's logit
        offsets and label counts before them (``predict_pseudo_labels``; every rank's cases under DDP)."""
        align_to = self.labeled_shares() if self.hparams["pseudo_label_alignment"] else None
        aligned = predict_pseudo_labels(self, self.unlabeled_images(), cases, self.store,
                                        use_mirroring=self.hparams["pseudo_label_mirroring"], align_to=align_to)
        if self.is_ddp:
            gathered = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, aligned)
            aligned = {k: v for part in gathered for k, v in part.items()}
        return aligned

    def selection_round(self) -> dict[str, Any]:
        """Step 2: rank the remaining unlabeled cases by proximity to the training set (eq. 6-7), pseudo-label the
        K closest with the current model, add them to the training set and rebuild the training loader. The
        round is recorded (state, JSON log) only once its pseudo-label files are written."""
        number = len(self.rounds) + 1
        start = time.perf_counter()
        labeled = list(self.do_split()[0])
        selected = self.pseudo_labeled_cases()
        done = set(selected)
        remaining = [c for c in self.unlabeled_identifiers if c not in done]
        reps = self.latent_representations(labeled, selected + remaining)
        training = labeled + selected
        proximity = proximity_matrix(np.stack([reps[c] for c in remaining]), np.stack([reps[c] for c in training]))
        scores = proximity_scores(proximity, self.schedule.num_neighbors)
        k = min(self.schedule.selection_size, len(remaining))
        # 'random' still computes the scores: the round's record keeps them, and the ablation costs what POPCORN does
        chosen = (select_closest(scores, remaining, k) if self.hparams["selection"] == "proximity"
                  else self.random_choice(remaining, k, number))
        cases = [remaining[i] for i in chosen]
        encoded = time.perf_counter()
        aligned = self.predict_pseudo_labels(cases)
        seconds_pseudo_labels = time.perf_counter() - encoded
        shares = self.pseudo_label_shares(cases)
        record = {
            "round": number,
            "epoch": self.current_epoch,
            "training_cases": len(training),
            "candidates": len(remaining),
            "selected": cases,
            "scores": [float(scores[i]) for i in chosen],
            "label_shares": {str(v): round(x, 5) for v, x in shares.items()},
            "seconds_representations": round(encoded - start, 3),
            "seconds_pseudo_labels": round(seconds_pseudo_labels, 3),
        }
        if aligned:  # the model's own shares, before the offsets: what the label-share check reads
            annotated = sum(aligned[c]["annotated"] for c in cases)
            unaligned = {v: sum(aligned[c]["counts"][v] for c in cases) / annotated if annotated else 0.0
                         for v in shares}
            record["label_shares_unaligned"] = {str(v): round(x, 5) for v, x in unaligned.items()}
            record["alignment_offsets"] = {c: aligned[c]["offsets"] for c in cases}
        self.rounds.append(record)
        self.write_state_log()
        self.print_to_log_file(
            f"POPCORN round {number}/{self.schedule.num_rounds}: {len(cases)} of {len(remaining)} unlabeled case(s) "
            f"pseudo-labeled ({record['seconds_representations']:.1f} s for {len(training) + len(remaining)} latent "
            f"representations, {record['seconds_pseudo_labels']:.1f} s for the pseudo-labels): "
            f"{', '.join(f'{c} ({s:.4g})' for c, s in zip(cases, record['scores']))}")
        self.check_label_shares(number, unaligned if aligned else shares, cases)
        self.restart_training_dataloader()
        return record

    def random_choice(self, remaining: list[str], k: int, number: int) -> list[int]:
        """Random selection: seeded runs draw from (seed, round number), so a resumed run draws what an uninterrupted
        one would; unseeded DDP runs use rank 0's draw on every rank."""
        seed = self.hparams["seed"]
        chosen = select_random(remaining, k, np.random.default_rng(None if seed is None else [seed, number]))
        if self.is_ddp and seed is None:
            box = [chosen]
            dist.broadcast_object_list(box, src=0)
            chosen = box[0]
        return chosen

    def _label_names(self) -> dict[int, str]:
        lm = self.label_manager
        names = {} if lm.has_regions else {v: k for k, v in lm.label_dict.items() if isinstance(v, int)}
        return {v: names.get(v, f"label {v}") for v in lm.all_labels}

    def pseudo_label_shares(self, cases: list[str]) -> dict[int, float]:
        """Each foreground label's share of the annotated voxels of these cases' pseudo-labels (label values; for
        region-based datasets the values regions are mapped back to)."""
        return label_shares((self.store.load(c)[0] for c in cases), self.foreground_labels(),
                            self.label_manager.ignore_label)

    def check_label_shares(self, number: int, shares: dict[int, float], cases: list[str]) -> None:
        """Warn when a class is much rarer in this round's pseudo-labels (with ``pseudo_label_alignment``, in the
        predictions before its offsets, which the alignment would hide) than in the labeled cases: every
        pseudo-label is the current model's prediction, so a class the first step has not learned yet (short in
        every round from round 1 on), or one the model misses on images unlike the labeled ones (later rounds,
        which take the least similar cases), is missing from them, and POPCORN then trains on its absence (README,
        POPCORNTrainer). Rounds recorded without shares (checkpoints from before this check) count as not short."""
        reference = self.labeled_shares()
        rare = underrepresented_labels(reference, shares)
        if not rare:
            return
        names = self._label_names()
        found = "; ".join(f"{names[v]} makes {100 * shares[v]:.1f}% of the annotated voxels against "
                          f"{100 * reference[v]:.1f}% in the labeled cases" for v in rare)
        earlier = [{int(v): x for v, x in r.get("label_shares_unaligned", r["label_shares"]).items()}
                   if "label_shares" in r else reference
                   for r in self.rounds[: number - 1]]
        short_from_round_1 = [v for v in rare if all(v in underrepresented_labels(reference, e) for e in earlier)]
        advice = (f"The model may not have learned the class(es) yet{'' if number == 1 else ' (short in every round)'}: "
                  f"if their validation pseudo Dice is low, train again with a longer first step (first_step_epochs, "
                  f"now {self.schedule.first_step_epochs}, in nnUNet_ssl_hparams)." if short_from_round_1 else
                  "The model predicts less of the class(es) on these images than the labeled cases hold: unless the "
                  "images hold less of them, their pseudo-labels carry the model's errors on images unlike the "
                  "labeled ones.")
        if self.hparams["pseudo_label_alignment"]:
            where = "predictions before pseudo_label_alignment"
            advice += (" The alignment gave the pseudo-labels the labeled cases' shares; for a class the model has "
                       "not learned, its offsets only move voxels the model cannot tell apart into that class.")
        else:
            where = "pseudo-labels"
        self.print_to_log_file(f"POPCORN warning: in round {number}'s {where} ({', '.join(cases)}) {found}. {advice}")
