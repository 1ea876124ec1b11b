"""Settings of the K-FAC family that are choices among named options."""

from __future__ import annotations

from enum import Enum


class DampingMode(str, Enum):
    """How damping λ enters the Kronecker-factored inverse (docs/method.md §3.4)."""

    # Lower-case canonical names: Hydra/OmegaConf look enum settings up (and dump them) by name.
    factored = "factored"  # (G + (√λ/π) I)^-1 ∇W (A + π√λ I)^-1, π from the factor traces
    eigen = "eigen"  # exact (A ⊗ G + λ I)^-1 in the Kronecker eigenbasis
    factored_unit = "factored_unit"  # π fixed (setting fixed_pi, default 1: Koroko et al.)


class FisherType(str, Enum):
    """Which targets define the output gradients g of the G factors."""

    # Lower-case canonical names: Hydra/OmegaConf look enum settings up (and dump them) by name.
    mc = "mc"  # targets sampled from the model's predictive distribution (true Fisher, 1 sample)
    empirical = "empirical"  # the data targets (empirical Fisher)
