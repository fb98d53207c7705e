"""The ``nnUNet_extTrainer`` folder of nnunet-ssl (installed as ``nnunet_ssl.ext_trainers``): import shims only."""
