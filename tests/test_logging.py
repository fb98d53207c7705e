"""Extra losses logged per epoch and drawn in a panel of their own in progress.png."""

import matplotlib.image as mpimg
import pytest
from nnunetv2.training.logging.nnunet_logger import LocalLogger

from nnunet_ssl.training.logging import SSLLocalLogger


def _fill(logger, epochs):
    for e in range(epochs):
        for k in logger.my_fantastic_logging:
            logger.log(k, [0.5, 0.4] if k == "dice_per_class_or_region" else 0.1 * e, e)


def test_progress_png_gets_an_extra_panel(tmp_path):
    plain, ssl = LocalLogger(), SSLLocalLogger(("loss_consistency", "consistency_weight"))
    _fill(plain, 3)
    _fill(ssl, 3)
    (tmp_path / "plain").mkdir()
    (tmp_path / "ssl").mkdir()
    plain.plot_progress_png(tmp_path / "plain")
    ssl.plot_progress_png(tmp_path / "ssl")
    h_plain, w_plain = mpimg.imread(tmp_path / "plain" / "progress.png").shape[:2]
    h_ssl, w_ssl = mpimg.imread(tmp_path / "ssl" / "progress.png").shape[:2]
    assert w_ssl == w_plain and h_ssl == pytest.approx(h_plain * 4 / 3, abs=2)  # nnU-Net's 3 panels + ours


def test_extra_keys_are_checkpointed_and_strict():
    logger = SSLLocalLogger(("loss_consistency",))
    _fill(logger, 2)
    restored = SSLLocalLogger(("loss_consistency",))
    restored.load_checkpoint(logger.get_checkpoint())
    assert restored.get_value("loss_consistency", step=None) == pytest.approx([0.0, 0.1])
    with pytest.raises(AssertionError):  # nnU-Net's rule: only registered keys
        restored.log("not_registered", 1.0, 0)
