"""Where the ``nnUNet_extTrainer`` shim folder is, and whether the environment points to it."""

from __future__ import annotations

import os
from pathlib import Path

ENV_VAR = "nnUNet_extTrainer"
SETUP_LINE = 'export nnUNet_extTrainer="$(nnunet_ssl trainers-path)"'


def trainers_path() -> Path:
    """The folder holding the import shims: ``trainers/`` of a source checkout (editable install) or
    ``nnunet_ssl/ext_trainers`` of a regular install; both are the package ``nnunet_ssl.ext_trainers``."""
    import nnunet_ssl.ext_trainers as shims

    return Path(next(iter(shims.__path__))).resolve()


def ext_trainer_configured() -> bool:
    folders = [p for p in os.environ.get(ENV_VAR, "").split(os.pathsep) if p.strip()]
    target = trainers_path()
    return any(Path(p).resolve() == target for p in folders if os.path.isdir(p))


def setup_hint() -> str:
    return (
        f"nnU-Net finds the nnunet_ssl trainers through the environment variable {ENV_VAR}, which does not "
        f"point to {trainers_path()}. Set it with:\n    {SETUP_LINE}\n(add the line to your shell profile to keep it)."
    )
