"""Registry of the plugin's trainers by name (used by the command line)."""

from __future__ import annotations

from nnunet_ssl.methods.must.trainer import MuSTTrainer
from nnunet_ssl.methods.ugmcl.trainer import DTCTrainer, MeanTeacherTrainer, UAMTTrainer, UGMCLTrainer
from nnunet_ssl.training.supervised import SupervisedTrainer

TRAINERS = {cls.__name__: cls for cls in (MuSTTrainer, UGMCLTrainer, MeanTeacherTrainer, UAMTTrainer, DTCTrainer,
                                          SupervisedTrainer)}
