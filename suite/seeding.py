"""Global random state and numerics settings every run (and benchmark) starts from."""

from __future__ import annotations

import random

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    """Seed every RNG the suite uses and make CPU kernels deterministic."""
    # Subnormal floats (saturated logistic units) slow CPU matmuls several-fold and skew
    # wall-clock comparisons; flushing them must happen before torch starts its thread pool.
    torch.set_flush_denormal(True)
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
