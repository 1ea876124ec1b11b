"""Coarse spaces of two-level K-FAC as strategies: one class per space (docs/method.md §4).

A space says how many vectors it puts on each layer, whether its basis follows the gradient
(then the coarse operator is rebuilt every step) or is fixed between inverse refreshes, whether
its coarse statistics are running averages (Nicolaides: the basis never changes), and how it
builds the per-layer bases from what the optimizer hands it (`BasisInputs`). It reads the
curvature blocks only through their public methods (`multiply_inverse`, `factor_eigenpairs`,
`shape`). A new space is one class here, registered in `SPACES`, plus its enum member and a
conf/optimizer preset.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from core.errors import ConfigError
from optimizers.coarse import (
    CoarseSpace,
    LayerBasis,
    dense_basis,
    enriched_basis,
    nicolaides_basis,
    spectral_basis,
)
from optimizers.curvature import KFACBlock

EigenPairs = tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]


@dataclass(frozen=True)
class BasisInputs:
    """What a coarse space may use to build its bases for the current step."""

    blocks: Sequence[KFACBlock]
    grads: list[Tensor]  # per-layer gradient matrices
    nbasis: int  # vectors per layer (checked by the space)
    eigenpairs: Callable[[], list[EigenPairs]]  # factor eigenpairs per layer (cached)
    residuals: Callable[[], list[Tensor]]  # r_i = K_i^-1 res_i, res = g − (F + λI) K^-1 g


class CoarseSpaceStrategy(Protocol):
    """One coarse space (see the module docstring)."""

    space: CoarseSpace
    default_nbasis: int
    gradient_dependent: bool  # rebuilt every step
    running_statistics: bool  # coarse statistics averaged over statistics steps

    def check_nbasis(self, count: int) -> None:
        """ConfigError naming ``nbasis`` when ``count`` does not suit the space."""
        ...

    def bases(self, inputs: BasisInputs) -> list[LayerBasis]:
        """The (not yet normalised) basis of every layer."""
        ...


def _krylov(block: KFACBlock, start: Tensor | None, *, nbasis: int) -> LayerBasis:
    """{r, K^-1 r, …} on one layer with nbasis vectors; r = 1 (kept apart) when start is None."""
    ones = start is None
    current = (
        torch.ones(block.shape, dtype=block.factor_dtype, device=block.weight.device)
        if start is None
        else start
    )
    vectors = [] if ones else [current]
    for _ in range(nbasis - 1):
        current = block.multiply_inverse(current)
        vectors.append(current)
    return dense_basis(torch.stack(vectors), with_ones=ones)


class _AnyCount:
    def check_nbasis(self, count: int) -> None:
        if count < 1:
            raise ConfigError("nbasis", f"must be >= 1 (or null for the default); got {count}")


class _OneVector:
    space: CoarseSpace

    def check_nbasis(self, count: int) -> None:
        if count != 1:
            raise ConfigError(
                "nbasis", f"{self.space.value} has exactly 1 vector per layer; got {count}"
            )


class _KrylovCount:
    space: CoarseSpace

    def check_nbasis(self, count: int) -> None:
        if count < 2:
            raise ConfigError(
                "nbasis", f"{self.space.value} needs >= 2 Krylov vectors; got {count}"
            )


class Nicolaides(_OneVector):
    """One all-ones vector per layer (the paper's reconstruction)."""

    space = CoarseSpace.nicolaides
    default_nbasis = 1
    gradient_dependent = False
    running_statistics = True

    def bases(self, inputs: BasisInputs) -> list[LayerBasis]:
        return [nicolaides_basis(block.shape) for block in inputs.blocks]


class Spectral(_AnyCount):
    """q_G q_A^T at the smallest factor eigenvalues (Koroko et al.)."""

    space = CoarseSpace.spectral
    default_nbasis = 1
    gradient_dependent = False
    running_statistics = False

    def bases(self, inputs: BasisInputs) -> list[LayerBasis]:
        return [
            spectral_basis(eig_a=ea, eig_g=eg, nbasis=inputs.nbasis)
            for ea, eg in inputs.eigenpairs()
        ]


class Residual(_OneVector):
    """K_i^-1 res_i with res = g − (F + λI) K^-1 g (Koroko et al.)."""

    space = CoarseSpace.residual
    default_nbasis = 1
    gradient_dependent = True
    running_statistics = False

    def bases(self, inputs: BasisInputs) -> list[LayerBasis]:
        return [dense_basis(r[None]) for r in inputs.residuals()]


class KrylovNicolaides(_KrylovCount):
    """{1, K_i^-1 1, …} (Koroko et al.)."""

    space = CoarseSpace.krylov_nicolaides
    default_nbasis = 2
    gradient_dependent = False
    running_statistics = False

    def bases(self, inputs: BasisInputs) -> list[LayerBasis]:
        return [_krylov(block, None, nbasis=inputs.nbasis) for block in inputs.blocks]


class KrylovResidual(_KrylovCount):
    """{r_i, K_i^-1 r_i, …} from the residual (Koroko et al.)."""

    space = CoarseSpace.krylov_residual
    default_nbasis = 2
    gradient_dependent = True
    running_statistics = False

    def bases(self, inputs: BasisInputs) -> list[LayerBasis]:
        return [
            _krylov(block, r, nbasis=inputs.nbasis)
            for block, r in zip(inputs.blocks, inputs.residuals(), strict=True)
        ]


class Enriched(_AnyCount):
    """All-ones plus the K-FAC eigenvectors with the largest gradient projection (2022)."""

    space = CoarseSpace.enriched
    default_nbasis = 3
    gradient_dependent = True
    running_statistics = False

    def bases(self, inputs: BasisInputs) -> list[LayerBasis]:
        return [
            enriched_basis(grad=g, eig_a=ea, eig_g=eg, nbasis=inputs.nbasis)
            for g, (ea, eg) in zip(inputs.grads, inputs.eigenpairs(), strict=True)
        ]


STRATEGIES: tuple[CoarseSpaceStrategy, ...] = (
    Nicolaides(),
    Spectral(),
    Residual(),
    KrylovNicolaides(),
    KrylovResidual(),
    Enriched(),
)
SPACES: dict[CoarseSpace, CoarseSpaceStrategy] = {s.space: s for s in STRATEGIES}


def resolve_nbasis(space: CoarseSpace, nbasis: int | None) -> int:
    """The number of vectors per layer for a coarse space; a one-line error when not allowed."""
    strategy = SPACES[space]
    count = strategy.default_nbasis if nbasis is None else int(nbasis)
    strategy.check_nbasis(count)
    return count
