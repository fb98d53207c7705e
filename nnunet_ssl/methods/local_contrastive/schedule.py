"""The self-training schedule of section IV.D, in optimizer steps.

The paper trains 5000 iterations with the segmentation loss on the labeled images only, then predicts pseudo-labels
for every unlabeled image and trains with eq. 2, re-estimating them every P = 5000 iterations, for 3 pseudo-labelling
rounds: 20000 iterations in all, a quarter of them supervised. Here the supervised phase is a fraction of nnU-Net's
schedule (``supervised_fraction`` 0.25), and the rest is split evenly into the rounds unless P is given
(``refresh_every``): with nnU-Net's 1000 x 250 iterations, pseudo-labels are made at iterations 62500, 125000 and
187500.
"""

from __future__ import annotations

from dataclasses import dataclass

from nnunet_ssl.training.hparams import HParamError


@dataclass(frozen=True)
class PseudoLabelSchedule:
    first: int  # iteration of the first pseudo-labels (the length of the supervised phase)
    every: int  # P
    rounds: int

    def iteration(self, round_index: int) -> int:
        """The iteration at which round ``round_index`` (0-based) makes its pseudo-labels."""
        return self.first + round_index * self.every

    def due(self, rounds_done: int, step: int) -> bool:
        """Whether the next round's pseudo-labels are due before optimizer step ``step`` (0-based)."""
        return rounds_done < self.rounds and step >= self.iteration(rounds_done)

    @classmethod
    def from_hparams(cls, hparams: dict, trainer_name: str) -> PseudoLabelSchedule:
        total = hparams["num_epochs"] * hparams["num_iterations_per_epoch"]
        first = round(hparams["supervised_fraction"] * total)
        rounds = hparams["pseudo_label_rounds"]
        every = hparams["refresh_every"] or (total - first) // rounds
        schedule = cls(first, every, rounds)
        last = schedule.iteration(rounds - 1)
        if every < 1 or last >= total:
            raise HParamError(
                f"{trainer_name}: the pseudo-label schedule does not fit into training: {total} iterations "
                f"(num_epochs x num_iterations_per_epoch), supervised phase {first} (supervised_fraction "
                f"{hparams['supervised_fraction']}), {rounds} round(s) (pseudo_label_rounds) every {every} "
                f"(refresh_every {hparams['refresh_every']}) put the last round at iteration {last}. Lower "
                f"pseudo_label_rounds, supervised_fraction or refresh_every, or train longer.")
        return schedule
