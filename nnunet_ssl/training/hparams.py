"""Hyper-parameters that users change without writing code.

``nnUNetv2_train`` takes no extra arguments, so values come from the environment variable
``nnUNet_ssl_hparams``: either a JSON object (``'{"temperature": 0.5}'``) or the path of a JSON file holding
one. Each trainer declares its parameters (defaults are its paper's); unknown names and bad values are
rejected before training starts, and the values in force are written to the fold folder and the checkpoint.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

ENV_VAR = "nnUNet_ssl_hparams"


_NO_LEGACY = object()


class HParamError(ValueError):
    """An unknown hyper-parameter or a bad value; the message names it and the accepted values."""


@dataclass(frozen=True)
class HParam:
    default: Any
    kind: type  # int, float, bool or str
    help: str
    low: float | None = None  # inclusive bounds
    high: float | None = None
    choices: tuple | None = None
    optional: bool = False  # None is accepted (and means "derive it", see help)
    high_exclusive: bool = False  # the upper bound itself is not accepted: [low, high)
    # the value that reproduces checkpoints written before this setting existed, if not the default
    legacy: Any = _NO_LEGACY
    # False: training never reads it (e.g. how the final validation predicts), so a resumed training may change it
    affects_training: bool = True

    def requirement(self) -> str:
        if self.choices is not None:
            req = "one of " + ", ".join(repr(c) for c in self.choices)
        else:
            req = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}[self.kind]
            close = ")" if self.high_exclusive else "]"
            if self.low is not None and self.high is not None:
                req += f" in [{self.low}, {self.high}{close}"
            elif self.low is not None:
                req += f" >= {self.low}"
            elif self.high is not None:
                req += f" {'<' if self.high_exclusive else '<='} {self.high}"
        return req + (" or null" if self.optional else "")

    def validate(self, name: str, value: Any) -> Any:
        bad = HParamError(f"hyper-parameter '{name}' = {value!r} is invalid: expected {self.requirement()}. "
                          f"{self.help}")
        if value is None:
            if self.optional:
                return None
            raise bad
        if self.kind is bool:
            if not isinstance(value, bool):
                raise bad
        elif self.kind is int:
            if isinstance(value, bool) or not isinstance(value, int):
                raise bad
        elif self.kind is float:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
                raise bad
            value = float(value)
        elif not isinstance(value, self.kind):
            raise bad
        if self.choices is not None and value not in self.choices:
            raise bad
        if (self.low is not None and value < self.low) or (self.high is not None and (
                value >= self.high if self.high_exclusive else value > self.high)):
            raise bad
        return value


def read_overrides(environ: Mapping[str, str] = os.environ) -> dict[str, Any]:
    raw = environ.get(ENV_VAR, "").strip()
    if not raw:
        return {}
    source = f"environment variable {ENV_VAR}"
    if not raw.startswith("{"):
        if not os.path.isfile(raw):
            raise HParamError(f"{source} = {raw!r} is neither a JSON object nor an existing JSON file. "
                              f"Use e.g. {ENV_VAR}='{{\"temperature\": 0.5}}' or a path to such a file.")
        source = f"file {raw} (from {ENV_VAR})"
        with open(raw) as f:
            raw = f.read()
    try:
        values = json.loads(raw)
    except json.JSONDecodeError as e:
        raise HParamError(f"{source} is not valid JSON: {e}") from None
    if not isinstance(values, dict):
        raise HParamError(f"{source} must hold a JSON object of name: value pairs, got {type(values).__name__}")
    return values


def resolve_hparams(spec: Mapping[str, HParam], trainer_name: str,
                    overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Defaults of ``spec`` updated with ``overrides`` (by default read from the environment), validated."""
    overrides = read_overrides() if overrides is None else overrides
    unknown = sorted(set(overrides) - set(spec))
    if unknown:
        raise HParamError(f"unknown hyper-parameter(s) for {trainer_name}: {', '.join(unknown)} (from {ENV_VAR}). "
                          f"Known: {', '.join(sorted(spec))}. Run `nnunet_ssl hparams {trainer_name}` to list them.")
    return {name: p.validate(name, overrides.get(name, p.default)) for name, p in spec.items()}


def with_legacy_values(spec: Mapping[str, HParam], saved: Mapping[str, Any]) -> dict[str, Any]:
    """A checkpoint's hyper-parameters, completed for settings added after it was written with the value that
    reproduces how it was trained, so that ``--c`` resumes the same training."""
    added = {n: p.legacy for n, p in spec.items() if n not in saved and p.legacy is not _NO_LEGACY}
    return {**added, **saved}


def checkpoint_hparams(spec: Mapping[str, HParam], trainer_name: str, saved: Mapping[str, Any]) -> dict[str, Any]:
    """The hyper-parameters a checkpoint was trained with, every setting filled in (legacy values for settings
    added after it was written, defaults for the rest) and validated: what ``--c`` resumes with."""
    return resolve_hparams(spec, trainer_name, with_legacy_values(spec, saved))


def describe(spec: Mapping[str, HParam]) -> str:
    width = max(len(n) for n in spec)
    return "\n".join(f"{n:<{width}}  default {p.default!r:<10} {p.requirement()}. {p.help}"
                     for n, p in sorted(spec.items()))
