"""Registry of the plugin's trainers by name (used by the command line)."""

from __future__ import annotations

from nnunet_ssl.methods.local_contrastive.trainer import LocalContrastiveTrainer
from nnunet_ssl.methods.mismatch.trainer import MisMatchTrainer
from nnunet_ssl.methods.must.trainer import MuSTTrainer
from nnunet_ssl.methods.popcorn.trainer import POPCORNTrainer
from nnunet_ssl.methods.ugmcl.trainer import DTCTrainer, MeanTeacherTrainer, UAMTTrainer, UGMCLTrainer
from nnunet_ssl.training.supervised import SupervisedTrainer

# the five methods, the classic baselines, the supervised baseline
TRAINERS = {cls.__name__: cls for cls in (MuSTTrainer, UGMCLTrainer, POPCORNTrainer, MisMatchTrainer,
                                          LocalContrastiveTrainer, MeanTeacherTrainer, UAMTTrainer, DTCTrainer,
                                          SupervisedTrainer)}
