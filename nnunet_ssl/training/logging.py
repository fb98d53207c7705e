"""nnU-Net's local logger with extra per-epoch keys and an extra panel in ``progress.png``."""

from __future__ import annotations

import os
import tempfile

import matplotlib

matplotlib.use("agg")
import matplotlib.image as mpimg
import matplotlib.pyplot as plt
from nnunetv2.training.logging.nnunet_logger import LocalLogger


class SSLLocalLogger(LocalLogger):
    """Logs ``extra_keys`` (one value per epoch, like nnU-Net's keys) and draws them below nnU-Net's own
    panels: nnU-Net's figure is rendered by nnU-Net's code and the semi-supervised panel is appended, so the
    standard panels stay exactly as users know them. Keys ending in ``_weight`` share a right-hand axis."""

    def __init__(self, extra_keys: tuple[str, ...], verbose: bool = False):
        super().__init__(verbose)
        self.extra_keys = tuple(extra_keys)
        for k in self.extra_keys:
            self.my_fantastic_logging[k] = []

    def load_checkpoint(self, checkpoint: dict):
        super().load_checkpoint(checkpoint)
        for k in self.extra_keys:  # checkpoints of a trainer without one of these keys
            self.my_fantastic_logging.setdefault(k, [])

    def plot_progress_png(self, output_folder):
        epoch = min(len(v) for v in self.my_fantastic_logging.values()) - 1
        if epoch < 0:
            return
        with tempfile.TemporaryDirectory() as tmp:
            super().plot_progress_png(tmp)
            standard = mpimg.imread(os.path.join(tmp, "progress.png"))
        h, w = standard.shape[:2]
        dpi = 100
        panel_h = h / 3  # same height as one of nnU-Net's panels
        fig = plt.figure(figsize=(w / dpi, (h + panel_h) / dpi), dpi=dpi)
        top = fig.add_axes((0, panel_h / (h + panel_h), 1, h / (h + panel_h)))
        top.imshow(standard)
        top.axis("off")
        ax = fig.add_axes((0.08, 0.02, 0.84, 0.9 * panel_h / (h + panel_h)))
        ax2 = ax.twinx()
        x = list(range(epoch + 1))
        for k in self.extra_keys:
            target = ax2 if k.endswith("_weight") else ax
            target.plot(x, self.my_fantastic_logging[k][: epoch + 1], ls="--" if target is ax2 else "-",
                        label=k, linewidth=4)
        ax.set_xlabel("epoch", fontsize=30)
        ax.set_ylabel("semi-supervised losses", fontsize=30)
        ax2.set_ylabel("ramp weight", fontsize=30)
        ax.tick_params(labelsize=25)
        ax2.tick_params(labelsize=25)
        ax.legend(loc="upper left", fontsize=25)
        ax2.legend(loc="upper right", fontsize=25)
        fd, tmp_png = tempfile.mkstemp(dir=output_folder, prefix=".progress.", suffix=".png")
        os.close(fd)
        fig.savefig(tmp_png, dpi=dpi)
        plt.close(fig)
        os.replace(tmp_png, os.path.join(output_folder, "progress.png"))
