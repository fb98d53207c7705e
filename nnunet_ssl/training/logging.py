"""nnU-Net's local logger with extra per-epoch keys and an extra panel in ``progress.png``."""

from __future__ import annotations

from unittest import mock

import matplotlib.pyplot as plt
from nnunetv2.training.logging.nnunet_logger import LocalLogger  # selects matplotlib's 'agg' backend


class SSLLocalLogger(LocalLogger):
    """Logs ``extra_keys`` (one value per epoch, like nnU-Net's keys) and draws them in a panel below nnU-Net's
    own panels. nnU-Net's plotting code draws its panels unchanged: while it runs, ``plt.subplots`` hands it a
    figure one panel taller and keeps the last axis for ours (about a third more drawing, no re-rendering).
    Keys ending in ``_weight`` share a right-hand axis."""

    def __init__(self, extra_keys: tuple[str, ...], verbose: bool = False):
        super().__init__(verbose)
        self.extra_keys = tuple(extra_keys)
        for k in self.extra_keys:
            self.my_fantastic_logging[k] = []

    def load_checkpoint(self, checkpoint: dict):
        super().load_checkpoint(checkpoint)
        for k in self.extra_keys:  # checkpoints of a trainer without one of these keys
            self.my_fantastic_logging.setdefault(k, [])

    def _draw_panel(self, ax, epoch: int) -> None:
        ax2 = ax.twinx()
        x = list(range(epoch + 1))
        for k in self.extra_keys:
            target = ax2 if k.endswith("_weight") else ax
            target.plot(x, self.my_fantastic_logging[k][: epoch + 1], ls="--" if target is ax2 else "-",
                        label=k, linewidth=4)
        ax.set_xlabel("epoch")
        ax.set_ylabel("semi-supervised losses")
        ax2.set_ylabel("ramp weight")
        ax.legend(loc=(0, 1))
        if any(k.endswith("_weight") for k in self.extra_keys):  # no empty legend (and its warning) otherwise
            ax2.legend(loc=(0.4, 1))

    def plot_progress_png(self, output_folder):
        if not self.extra_keys:
            return super().plot_progress_png(output_folder)
        epoch = min(len(v) for v in self.my_fantastic_logging.values()) - 1
        subplots = plt.subplots

        def subplots_with_panel(nrows=1, ncols=1, **kwargs):
            w, h = kwargs.pop("figsize")
            fig, axes = subplots(nrows + 1, ncols, figsize=(w, h * (nrows + 1) / nrows), **kwargs)
            self._draw_panel(axes[-1], epoch)
            return fig, axes[:-1]

        with mock.patch.object(plt, "subplots", subplots_with_panel):
            super().plot_progress_png(output_folder)
