"""Settings of the K-FAC family that are choices among named options."""

from __future__ import annotations

from enum import Enum
from typing import TypeVar


class DampingMode(str, Enum):
    """How damping λ enters the Kronecker-factored inverse (REFERENCE §2)."""

    # Lower-case canonical names: Hydra/OmegaConf look enum settings up (and dump them) by name.
    factored = "factored"  # (G + (√λ/π) I)^-1 ∇W (A + π√λ I)^-1, π from the factor traces
    eigen = "eigen"  # exact (A ⊗ G + λ I)^-1 in the Kronecker eigenbasis
    factored_unit = "factored_unit"  # (G + √λ I)^-1 ∇W (A + √λ I)^-1: π = 1 (Koroko et al.)


class FisherType(str, Enum):
    """Which targets define the output gradients g of the G factors."""

    # Lower-case canonical names: Hydra/OmegaConf look enum settings up (and dump them) by name.
    mc = "mc"  # targets sampled from the model's predictive distribution (true Fisher, 1 sample)
    empirical = "empirical"  # the data targets (empirical Fisher)


E = TypeVar("E", bound=Enum)


def parse_enum(enum: type[E], value: object, *, setting: str) -> E:
    """Turn a member or its value into a member; a clear error names the setting otherwise."""
    if isinstance(value, enum):
        return value
    raw = getattr(value, "value", value)
    try:
        return enum(raw)
    except ValueError:
        allowed = ", ".join(str(m.value) for m in enum)
        raise ValueError(f"{setting}: got {raw!r}; allowed: {allowed}") from None
