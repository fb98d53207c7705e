"""Import shim for nnU-Net's ``nnUNet_extTrainer`` lookup.

nnU-Net imports every module of this folder as a top-level module and drops it from ``sys.modules``
afterwards, so the classes must live in the installed ``nnunet_ssl`` package (picklable, importable by
name); this module only re-exports them.
"""

from nnunet_ssl.methods.local_contrastive.trainer import LocalContrastiveTrainer
from nnunet_ssl.methods.mismatch.trainer import MisMatchTrainer
from nnunet_ssl.methods.must.trainer import MuSTTrainer
from nnunet_ssl.methods.popcorn.trainer import POPCORNTrainer
from nnunet_ssl.methods.ugmcl.trainer import DTCTrainer, MeanTeacherTrainer, UAMTTrainer, UGMCLTrainer
from nnunet_ssl.training.supervised import SupervisedTrainer

__all__ = ["DTCTrainer", "LocalContrastiveTrainer", "MeanTeacherTrainer", "MisMatchTrainer", "MuSTTrainer",
           "POPCORNTrainer", "SupervisedTrainer", "UAMTTrainer", "UGMCLTrainer"]
