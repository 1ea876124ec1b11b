"""Settings of the K-FAC family that are choices among named options."""

from __future__ import annotations

from enum import Enum
from typing import TypeVar


class DampingMode(str, Enum):
    """How damping λ enters the Kronecker-factored inverse (REFERENCE §2)."""

    FACTORED = "factored"  # (G + (√λ/π) I)^-1 ∇W (A + π√λ I)^-1, π from the factor traces
    EIGEN = "eigen"  # exact (A ⊗ G + λ I)^-1 in the Kronecker eigenbasis
    # Lower-case aliases: Hydra/OmegaConf look enum settings up by member name (YAML values).
    factored = "factored"
    eigen = "eigen"


class FisherType(str, Enum):
    """Which targets define the output gradients g of the G factors."""

    MC = "mc"  # targets sampled from the model's predictive distribution (true Fisher, 1 sample)
    EMPIRICAL = "empirical"  # the data targets (empirical Fisher)
    # Lower-case aliases: Hydra/OmegaConf look enum settings up by member name (YAML values).
    mc = "mc"
    empirical = "empirical"


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
