"""Ramp-up schedules for unsupervised loss weights, as functions of the training iteration."""

from __future__ import annotations

import math

RAMPS = ("linear", "sigmoid")


def linear_rampup(step: int, length: int) -> float:
    """0 at step 0, rising linearly to 1 at ``length`` and staying there."""
    if length <= 0:
        return 1.0
    return min(max(step / length, 0.0), 1.0)


def sigmoid_rampup(step: int, length: int) -> float:
    """The 'sigmoid-shaped' Gaussian ramp-up of Laine & Aila (2017) and Tarvainen & Valpola (2017):
    exp(-5 (1 - t)^2) with t = step / length clipped to [0, 1]."""
    if length <= 0:
        return 1.0
    t = min(max(step / length, 0.0), 1.0)
    return float(math.exp(-5.0 * (1.0 - t) ** 2))


def rampup(kind: str, step: int, length: int) -> float:
    if kind == "linear":
        return linear_rampup(step, length)
    if kind == "sigmoid":
        return sigmoid_rampup(step, length)
    raise ValueError(f"unknown ramp-up '{kind}', choose one of {RAMPS}")
