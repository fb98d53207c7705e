"""POPCORN's progressive data selection (sections 2.3-2.4): the proximity graph (eq. 6), the selection of the K
unlabeled cases closest to the training set (eq. 7), and the default schedule of selection rounds."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

PAPER_ROUNDS = 15  # the paper integrates M = 2901 unlabeled images K = 200 at a time: ceil(2901 / 200) rounds
FIRST_STEP_FRACTION = 0.5  # share of the epochs trained on the labeled cases alone by default (see derive_schedule)


def proximity_matrix(unlabeled: np.ndarray, training: np.ndarray) -> np.ndarray:
    """Eq. 6: P[i, j] = ||h(X_i) - h(X_j)||_2, the Euclidean distance between the latent representations of
    unlabeled case i (rows of ``unlabeled``, (U, D)) and training case j (rows of ``training``, (T, D)); fp64."""
    u = np.asarray(unlabeled, dtype=np.float64)
    t = np.asarray(training, dtype=np.float64)
    return np.sqrt(((u[:, None, :] - t[None, :, :]) ** 2).sum(-1))


def proximity_scores(proximity: np.ndarray, num_neighbors: int) -> np.ndarray:
    """The inner sum of eq. 7: for each unlabeled case (row), the sum of its ``num_neighbors`` (p) smallest
    distances to the training set; with fewer than p training cases, the sum over all of them."""
    p = min(num_neighbors, proximity.shape[1])
    return np.sort(proximity, axis=1)[:, :p].sum(1)


def select_closest(scores: Sequence[float], cases: Sequence[str], k: int) -> list[int]:
    """Eq. 7: the indices of the ``k`` lowest scores (all of them if fewer), lowest first. Equal scores are ordered
    by case identifier, so the choice does not depend on the order in which cases were listed."""
    order = sorted(range(len(cases)), key=lambda i: (float(scores[i]), cases[i]))
    return order[:k]


def select_random(cases: Sequence[str], k: int, rng: np.random.Generator) -> list[int]:
    """The ablation "without proximity graph" of section 4.1: the indices of ``k`` of ``cases`` drawn at random
    (all of them if fewer), in the order drawn. Cases are drawn from their identifiers' sorted order, so the choice
    does not depend on the order in which they were listed."""
    order = sorted(range(len(cases)), key=lambda i: cases[i])
    return [order[i] for i in rng.permutation(len(cases))[:k]]


class ScheduleError(ValueError):
    """Selection settings that cannot integrate every unlabeled case before training ends."""


@dataclass(frozen=True)
class Schedule:
    """When POPCORN selects. Step 1 trains ``first_step_epochs`` epochs on the labeled cases; selection round r
    (1-based) runs at the start of epoch ``first_step_epochs + (r - 1) * epochs_per_round`` and adds
    ``selection_size`` cases (the last round the rest), until all ``num_unlabeled`` cases are in."""

    num_unlabeled: int
    selection_size: int
    epochs_per_round: int
    first_step_epochs: int
    num_neighbors: int

    @property
    def num_rounds(self) -> int:
        return math.ceil(self.num_unlabeled / self.selection_size)

    def round_epoch(self, r: int) -> int:
        return self.first_step_epochs + (r - 1) * self.epochs_per_round

    @property
    def round_epochs(self) -> list[int]:
        return [self.round_epoch(r) for r in range(1, self.num_rounds + 1)]

    def as_dict(self) -> dict:
        return {**asdict(self), "num_rounds": self.num_rounds, "round_epochs": self.round_epochs}


def derive_schedule(num_unlabeled: int, num_epochs: int, selection_size: int | None = None,
                    epochs_per_round: int | None = None, first_step_epochs: int | None = None,
                    num_neighbors: int = 5) -> Schedule:
    """Fill in the unset values (None) so that every unlabeled case is integrated before training ends:

        E1 = max(1, round(num_epochs / 2))                       first step (labeled cases only)
        K  = ceil(M / min(15, M, num_epochs - E1))               cases per round (15: the paper's rounds)
        R  = ceil(M / K)                                         rounds
        N  = floor((num_epochs - E1) / R)                        epochs per round

    so the last round starts at epoch E1 + (R - 1) N <= num_epochs - N and its cases are trained on for N epochs.
    The paper trains step 1 "until convergence" (section 2.4); half the schedule stands in for it because every
    pseudo-label is fixed at its round, and a first round at a quarter of the schedule made them before the
    labeled-only model had converged (docs/benchmarks.md: better at half on 1200 and 4800 iterations).
    Set values are kept; if they cannot fit (the last round would start at or after ``num_epochs``) a
    ``ScheduleError`` says which value to change."""
    m = num_unlabeled
    if m < 1:
        raise ScheduleError("POPCORN needs at least one unlabeled case")
    if num_epochs < 2:
        raise ScheduleError(f"POPCORN needs num_epochs >= 2 (a first step on the labeled cases, then at least one "
                            f"epoch with pseudo-labels); num_epochs = {num_epochs}. Raise num_epochs in "
                            f"nnUNet_ssl_hparams.")
    e1 = max(1, round(num_epochs * FIRST_STEP_FRACTION)) if first_step_epochs is None else first_step_epochs
    if not 1 <= e1 < num_epochs:
        raise ScheduleError(f"first_step_epochs = {e1} must lie in [1, num_epochs - 1 = {num_epochs - 1}] so that "
                            f"at least one epoch trains with pseudo-labels; lower first_step_epochs or raise "
                            f"num_epochs.")
    remaining_epochs = num_epochs - e1
    k = math.ceil(m / min(PAPER_ROUNDS, m, remaining_epochs)) if selection_size is None else selection_size
    rounds = math.ceil(m / k)
    n = remaining_epochs // rounds if epochs_per_round is None else epochs_per_round
    schedule = Schedule(m, k, n, e1, num_neighbors)
    last = schedule.round_epoch(rounds)
    if n < 1 or last >= num_epochs:
        raise ScheduleError(
            f"POPCORN cannot integrate all {m} unlabeled cases before training ends: with selection_size = {k} "
            f"({rounds} rounds), first_step_epochs = {e1} and epochs_per_round = {max(n, 0)}, the last round would "
            f"start at epoch {last} but num_epochs = {num_epochs}. Raise selection_size or num_epochs, or lower "
            f"epochs_per_round or first_step_epochs (null derives them: see `nnunet_ssl hparams POPCORNTrainer`).")
    return schedule
