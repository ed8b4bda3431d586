"""Arrays in, numbers out: the pure maths of evaluation and calibration (no I/O, no models)."""

from __future__ import annotations

import numpy as np


def logit(p_male) -> np.ndarray:
    clipped = np.clip(np.asarray(p_male, dtype=np.float64), 1e-7, 1 - 1e-7)
    return np.log(clipped / (1 - clipped))


def apply_temperature(p_male, temperature: float | None) -> np.ndarray:
    """``sigmoid(logit(p) / T)``: temperature scaling (Guo et al., 2017); ``None`` or 1 leaves p unchanged."""
    p_male = np.asarray(p_male, dtype=np.float64)
    if not temperature or temperature == 1.0:
        return p_male
    return 1 / (1 + np.exp(-logit(p_male) / float(temperature)))
