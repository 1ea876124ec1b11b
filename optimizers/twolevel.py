"""Two-level K-FAC (Tselepidis, Kohler, Orvieto 2020) and its follow-up variants.

The method: docs/method.md §4.

K-FAC's block-diagonal inverse K^-1 is corrected by a coarse solve that restores inter-layer
curvature on a few directions per layer. With R0 (m × N) the restriction to the coarse space,
C = F_c + D_c the damped coarse Fisher and Q = ω2 · R0^T C^-1 R0:

- `additive` (the paper):   P^-1 g = ω1 K^-1 g + Q g
- `deflated` (2022):        (I − Q F_λ) ω1 K^-1 g + Q g
- `balanced` (2022):        (I − Q F_λ) ω1 K^-1 (I − F_λ Q) g + Q g

F_λ = F + λI is the damped mini-batch Fisher of the latest statistics batch, applied by
Fisher-vector products from the captured per-example (ā, g) of the K-FAC layers (never as a
matrix). The published deflated/balanced forms have ω1 = ω2 = 1; the weights there are a suite
extension. Parameters outside Linear/Conv2d layers (BatchNorm, ...) take the plain gradient.

When the coarse operator is (re)built:

- Nicolaides (fixed basis): at every statistics step the batch coarse statistics enter running
  averages with K-FAC's ε_k = min(1 − 1/(k+1), ε_max): for `kron` the L × L position-averaged
  second moments M^a, M^g of the per-example sums s^a = 1^T ā, s^g = 1^T g (so F_c = c ⊙ M^a ⊙ M^g
  is built from averaged factors, as K-FAC averages A and G); for `exact` the L × L coarse
  Fisher itself. C is assembled and factored on inverse steps (every T_inv) and when λ changes.
- `spectral`, `krylov_nicolaides` (basis fixed between inverse refreshes): basis and F_c from
  the latest statistics batch, on inverse steps and when λ changes; no running average (the
  basis changes).
- `residual`, `krylov_residual`, `enriched` (the basis depends on the gradient): rebuilt every
  step from the latest statistics batch. The preconditioner is then not a fixed linear map.

The coarse solve factors C in float64; its Fisher part is projected onto the PSD cone first (a
no-op except for `kron` across conv maps of different size, see `optimizers.coarse`).

Stability. The additive preconditioner is symmetric positive definite, so ⟨Δ, g⟩ > 0 and K-FAC's
KL clip bounds the step. Deflated and balanced are not symmetric: the projector property
(I − Q F_λ)² = I − Q F_λ needs C = R0 F_λ R0^T (`exact` + `projected`), and even then ⟨Δ, g⟩ can
be negative when K-FAC's K and the mini-batch F_λ differ much (small λ, small batches); the KL
clip then leaves the step unscaled. Such steps are counted (`nondescent_steps`).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from enum import Enum
from typing import Any

import torch
from torch import Tensor, nn

from core.errors import ConfigError
from core.settings import bounded
from optimizers.coarse import (
    BasisNorm,
    CoarseDamping,
    CoarseDownsample,
    CoarseFisher,
    CoarseRefresh,
    CoarseSolver,
    CoarseSpace,
    LayerBasis,
    LayerStats,
    accumulate_coarse,
    coarse_damping,
    coarse_fisher,
    exact_coarse_fisher,
    factor_coarse,
    fisher_vector_product,
    kron_nicolaides_fisher,
    kron_scale,
    nicolaides_moments,
    normalise_basis,
    ones_scales,
    per_example_projections,
    prolong,
    restrict,
)
from optimizers.coarse_spaces import SPACES, BasisInputs, EigenPairs, resolve_nbasis
from optimizers.curvature import ema_decay
from optimizers.kfac import KFAC, KFACConfig

# Diagnostics materialise per-example gradients (B × N): skipped above this many entries.
DIAGNOSTICS_MAX_ENTRIES = 20_000_000
# Safety limits: a coarse correction this many times larger than the K-FAC step (norms, checked
# on statistics steps), or a coarse matrix this ill-conditioned, is warned about and counted.
COARSE_SHARE_MAX = 10.0
COARSE_COND_MAX = 1.0e8
# Koroko et al.'s coarse settings, named by a safety warning when a run uses others.
SAFE_SETTINGS: dict[str, Enum] = {
    "coarse_fisher": CoarseFisher.exact,
    "coarse_damping": CoarseDamping.projected,
    "basis_norm": BasisNorm.max,
}


class CoarseSafetyWarning(RuntimeWarning):
    """The coarse level dominates the step or its matrix is nearly singular."""


class Combination(str, Enum):
    """How the fine (K-FAC) and coarse levels combine."""

    additive = "additive"  # ω1 K^-1 g + Q g (paper)
    deflated = "deflated"  # (I − Q F_λ) ω1 K^-1 g + Q g (first author, 2022)
    balanced = "balanced"  # (I − Q F_λ) ω1 K^-1 (I − F_λ Q) g + Q g (first author, 2022)


@dataclass
class TwoLevelKFACConfig(KFACConfig):
    """Two-level K-FAC settings; defaults are the paper's reconstruction (docs/method.md §4.2)."""

    name: str = "kfac2"
    coarse_space: CoarseSpace = CoarseSpace.nicolaides  # paper: one all-ones vector per layer
    nbasis: int | None = bounded(  # vectors per layer (krylov: >= 2; enriched: ones + nbasis − 1)
        None, ge=1, integer=True, null="the coarse space's default"
    )
    basis_norm: BasisNorm = BasisNorm.none  # paper: not normalised; Koroko et al.: max
    coarse_fisher: CoarseFisher = CoarseFisher.kron  # paper: kron; Koroko et al.: exact
    coarse_damping: CoarseDamping = CoarseDamping.diagonal  # paper: λ I; Koroko et al.: λ R0 R0^T
    combination: Combination = Combination.additive  # paper: additive; 2022: deflated, balanced
    omega1: float = bounded(1.0, ge=0)  # weight of the fine level (paper: 1); 0: coarse step only
    omega2: float = bounded(1.0, ge=0)  # weight of the coarse level (paper: 1); 0: K-FAC exactly
    coarse_refresh: CoarseRefresh = CoarseRefresh.rebuild  # authors' paper-time code: accumulate
    coarse_downsample: CoarseDownsample = CoarseDownsample.centre  # authors' code: nearest

    def __post_init__(self) -> None:
        super().__post_init__()
        resolve_nbasis(self.coarse_space, self.nbasis)  # the count must suit the space
        if (
            self.coarse_refresh is CoarseRefresh.accumulate
            and self.coarse_space is not CoarseSpace.nicolaides
        ):
            raise ConfigError(
                "coarse_refresh",
                f"accumulate needs coarse_space=nicolaides (a fixed basis); "
                f"got {self.coarse_space.value}; allowed: rebuild",
            )


@dataclass
class _Operator:
    """A built coarse operator: per-layer bases and the factored coarse matrix."""

    bases: list[LayerBasis]
    solver: CoarseSolver
    fisher: Tensor  # F_c as used (before the PSD projection and damping)


class TwoLevelKFAC(KFAC):
    """K-FAC with a coarse-space correction; see the module docstring."""

    config_type: type[KFACConfig] = TwoLevelKFACConfig

    def __init__(
        self, model: nn.Module, config: TwoLevelKFACConfig | None = None, **settings: Any
    ) -> None:
        """Two-level K-FAC over ``model`` with ``config`` (default: `TwoLevelKFACConfig()`),
        single fields replaced by ``settings``; an invalid value raises a one-line ConfigError."""
        super().__init__(model, config, **settings)
        cfg = self.config
        assert isinstance(cfg, TwoLevelKFACConfig)
        self.coarse_space = cfg.coarse_space
        self.strategy = SPACES[cfg.coarse_space]
        self.nbasis = resolve_nbasis(cfg.coarse_space, cfg.nbasis)
        self.basis_norm = cfg.basis_norm
        self.coarse_fisher = cfg.coarse_fisher
        self.coarse_damping = cfg.coarse_damping
        self.combination = cfg.combination
        self.omega1 = float(cfg.omega1)
        self.omega2 = float(cfg.omega2)
        self.coarse_refresh = cfg.coarse_refresh
        self.coarse_downsample = cfg.coarse_downsample
        unsupported = [
            f"'{name}' ({block.kind})"
            for name, block in zip(self.block_names, self.blocks, strict=True)
            if not block.coarse_supported
        ]
        if unsupported and self.omega2 > 0:
            raise ValueError(
                "two-level K-FAC: no coarse level for layers " + ", ".join(unsupported) + " "
                "(grouped convolutions and embeddings); use kfac, or omega2=0"
            )
        self.coarse_extreme_share = 0  # statistics steps with ‖coarse‖ > COARSE_SHARE_MAX‖fine‖
        self.coarse_extreme_cond = 0  # operator builds with cond(C) > COARSE_COND_MAX
        self._warned: set[str] = set()
        # running coarse statistics (Nicolaides only) and the built operator
        self._moments: tuple[Tensor, Tensor] | None = None
        self._exact_fisher: Tensor | None = None
        self.coarse_updates = 0
        # coarse_refresh=accumulate: summed off-diagonals, latest F_c, refresh due at next build
        self._accumulated: Tensor | None = None
        self._accumulated_fisher: Tensor | None = None
        self._refresh_due = True
        self._operator: _Operator | None = None
        self._stale = True
        self._eig_cache: list[EigenPairs] | None = None
        self._last: dict[str, Any] | None = None
        self._nondescent: Tensor | None = None

    # ------------------------------------------------------------------ settings
    @property
    def coarse_active(self) -> bool:
        """Whether the coarse level contributes at all (ω2 > 0 and there are layers)."""
        return self.omega2 > 0 and bool(self.blocks)

    def describe(self) -> str:
        """One line: K-FAC's description plus the two-level settings."""
        return (
            f"{super().describe()}; two-level: {self.coarse_space.value} ×{self.nbasis}, "
            f"norm={self.basis_norm.value}, F_c={self.coarse_fisher.value}, "
            f"D_c={self.coarse_damping.value}, {self.combination.value}, "
            f"ω1={self.omega1:g}, ω2={self.omega2:g}, refresh={self.coarse_refresh.value}, "
            f"downsample={self.coarse_downsample.value}"
        )

    def data_parallel_unsupported(self) -> list[str]:
        """K-FAC's, plus coarse levels that read the rank-local latest batch."""
        out = super().data_parallel_unsupported()
        cfg = self.config  # read from the config: called from K-FAC's constructor
        assert isinstance(cfg, TwoLevelKFACConfig)
        active = cfg.omega2 > 0 and bool(self.blocks)
        if active and cfg.coarse_space is not CoarseSpace.nicolaides:
            out.append(f"coarse_space={cfg.coarse_space.value} (only nicolaides)")
        if active and cfg.combination is not Combination.additive:
            out.append(f"combination={cfg.combination.value} (only additive)")
        return out

    def coarse_running_statistics(self) -> tuple[list[Tensor | None], list[tuple[int, ...]]]:
        """The Nicolaides running coarse statistics (None before the first) and their shapes.

        Read and overwritten in place by the data-parallel reduction (optimizers.distributed).
        """
        size = len(self.blocks)
        if self.coarse_fisher is CoarseFisher.kron:
            moments = self._moments or (None, None)
            return list(moments), [(size, size), (size, size)]
        return [self._exact_fisher], [(size, size)]

    # ------------------------------------------------------------------ curvature stages
    def layer_stats(self) -> list[LayerStats] | None:
        """Captured (ā, g) of every block (latest statistics step); None if any is missing."""
        if any(b.a is None or b.g is None for b in self.blocks):
            return None
        return [LayerStats(a=b.a, g=b.g, grid=b.grid) for b in self.blocks]  # type: ignore[arg-type]

    def update_statistics(self) -> None:
        """K-FAC's running factors, then the Nicolaides running coarse statistics."""
        super().update_statistics()
        if not self.coarse_active or not self.strategy.running_statistics:
            return
        stats = self.layer_stats()
        if stats is None:
            return
        decay = ema_decay(self.coarse_updates, self.ema_max)
        if self.coarse_fisher is CoarseFisher.kron:
            batch = nicolaides_moments(stats, self.coarse_downsample)
            if not all(bool(torch.isfinite(m).all()) for m in batch):
                return
            if self._moments is None:
                self._moments = (torch.zeros_like(batch[0]), torch.zeros_like(batch[1]))
            for run, new in zip(self._moments, batch, strict=True):
                run.mul_(decay).add_(new, alpha=1.0 - decay)
        else:
            bases = self._fixed_bases()
            fisher = exact_coarse_fisher(per_example_projections(stats, bases))
            if not bool(torch.isfinite(fisher).all()):
                return
            if self._exact_fisher is None:
                self._exact_fisher = torch.zeros_like(fisher)
            self._exact_fisher.mul_(decay).add_(fisher, alpha=1.0 - decay)
        self.coarse_updates += 1

    def release_statistics(self) -> None:
        """Keep the captured (ā, g): the coarse level reads the latest batch on every step."""

    def update_inverses(self) -> None:
        """K-FAC's inverses; the coarse operator is rebuilt at the next step."""
        super().update_inverses()
        self._stale = True
        self._refresh_due = True
        self._eig_cache = None

    def refresh_damping(self) -> None:
        """Re-damp K-FAC's inverses; the coarse operator is rebuilt with the new λ."""
        super().refresh_damping()
        self._stale = True

    # ------------------------------------------------------------------ coarse bases
    def _fixed_bases(self) -> list[LayerBasis]:
        """Bases of a running-statistics space (they depend on the layer shapes only)."""

        def unavailable() -> Any:
            raise RuntimeError(
                f"{self.coarse_space.value}: a running-statistics space's basis "
                "must not depend on the gradient or the factors"
            )

        inputs = BasisInputs(
            blocks=self.blocks,
            grads=[],
            nbasis=self.nbasis,
            eigenpairs=unavailable,
            residuals=unavailable,
        )
        return [normalise_basis(b, self.basis_norm) for b in self.strategy.bases(inputs)]

    def _eigenpairs(self) -> list[EigenPairs]:
        """Factor eigenpairs per block (`KFACBlock.factor_eigenpairs`), cached until the next
        inverse refresh."""
        if self._eig_cache is None:
            self._eig_cache = [block.factor_eigenpairs() for block in self.blocks]
        return self._eig_cache

    def _residual(
        self, grads: list[Tensor], fine: list[Tensor], stats: list[LayerStats]
    ) -> list[Tensor]:
        """r_i = K_i^-1 res_i with res = g − (F + λI) K^-1 g."""
        fv = fisher_vector_product(stats, fine)
        lam = self.damping
        return [
            block.multiply_inverse(g - f - lam * u)
            for block, g, f, u in zip(self.blocks, grads, fv, fine, strict=True)
        ]

    def build_bases(
        self, grads: list[Tensor], fine: list[Tensor], stats: list[LayerStats]
    ) -> list[LayerBasis]:
        """The coarse basis of every layer (normalised) for the current state and gradient."""
        inputs = BasisInputs(
            blocks=self.blocks,
            grads=grads,
            nbasis=self.nbasis,
            eigenpairs=self._eigenpairs,
            residuals=lambda: self._residual(grads, fine, stats),
        )
        return [normalise_basis(b, self.basis_norm) for b in self.strategy.bases(inputs)]

    # ------------------------------------------------------------------ coarse operator
    def _fisher_for(self, bases: list[LayerBasis], stats: list[LayerStats]) -> Tensor | None:
        """F_c: running averages (Nicolaides), else from the latest statistics batch."""
        if not self.strategy.running_statistics:
            return coarse_fisher(self.coarse_fisher, stats, bases, self.coarse_downsample)
        if self.coarse_refresh is CoarseRefresh.accumulate and not self._refresh_due:
            return self._accumulated_fisher  # λ changed only: the same F_c, re-damped
        if self.coarse_fisher is CoarseFisher.exact:
            fresh = self._exact_fisher
        elif self._moments is None:
            fresh = None
        else:
            scales = ones_scales(bases, dtype=self._moments[0].dtype)
            scale = kron_scale(stats, self.coarse_downsample)
            fresh = kron_nicolaides_fisher(*self._moments, scale, scales)
        if fresh is None or self.coarse_refresh is CoarseRefresh.rebuild:
            return fresh
        used, self._accumulated = accumulate_coarse(self._accumulated, fresh)
        self._accumulated_fisher = used
        self._refresh_due = False
        return used

    def _build_operator(
        self, grads: list[Tensor], fine: list[Tensor], stats: list[LayerStats]
    ) -> _Operator | None:
        bases = self.build_bases(grads, fine, stats)
        fisher = self._fisher_for(bases, stats)
        if fisher is None:
            return None
        damping = coarse_damping(
            self.coarse_damping, bases, self.damping, dtype=fisher.dtype, device=fisher.device
        )
        solver = factor_coarse(fisher, damping)
        cond = solver.condition_number()
        if not cond <= COARSE_COND_MAX:
            self.coarse_extreme_cond += 1
            self._warn_once(
                "cond",
                f"two-level K-FAC: coarse matrix condition number {cond:.3g} > "
                f"{COARSE_COND_MAX:g} at step {self.counters.steps}; the coarse step may swamp "
                f"the K-FAC step ({self._safer_hint()})",
            )
        return _Operator(bases=bases, solver=solver, fisher=fisher)

    def _safer_hint(self) -> str:
        """Name the Koroko et al. settings this optimizer does not use yet (or say it uses all)."""
        differ = [
            f"{name}={value.value}"
            for name, value in SAFE_SETTINGS.items()
            if getattr(self, name) is not value
        ]
        if not differ:
            return "already at Koroko et al.'s coarse settings"
        return f"safer: {', '.join(differ)} (Koroko et al.)"

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, CoarseSafetyWarning, stacklevel=4)

    def _check_share(self, fine: list[Tensor], update: list[Tensor]) -> None:
        """Count (and warn once about) steps whose coarse part dwarfs the K-FAC part."""
        w1 = self.omega1
        fine_sq = sum(float((w1 * u).pow(2).sum()) for u in fine)
        coarse_sq = sum(float((v - w1 * u).pow(2).sum()) for u, v in zip(fine, update, strict=True))
        if fine_sq > 0 and not coarse_sq <= COARSE_SHARE_MAX**2 * fine_sq:
            self.coarse_extreme_share += 1
            ratio = math.sqrt(coarse_sq / fine_sq)
            self._warn_once(
                "share",
                f"two-level K-FAC: coarse correction {ratio:.3g}× the K-FAC step (> "
                f"{COARSE_SHARE_MAX:g}×) at step {self.counters.steps}; the KL clip will shrink "
                f"the whole step ({self._safer_hint()})",
            )

    def coarse_operator(
        self, grads: list[Tensor], fine: list[Tensor], stats: list[LayerStats]
    ) -> _Operator | None:
        """The coarse operator for this step: cached, or rebuilt when due."""
        if self.strategy.gradient_dependent:
            return self._build_operator(grads, fine, stats)
        if self._stale or self._operator is None:
            self._operator = self._build_operator(grads, fine, stats)
            self._stale = self._operator is None
        return self._operator

    # ------------------------------------------------------------------ preconditioner
    def precondition(self, grads: list[Tensor]) -> list[Tensor]:
        """Two-level update matrices from gradient matrices (see the module docstring)."""
        fine = super().precondition(grads)
        operator, stats = None, None
        if self.coarse_active and all(b.has_inverse for b in self.blocks):
            stats = self.layer_stats()
            if stats is None:
                missing = [
                    name
                    for name, b in zip(self.block_names, self.blocks, strict=True)
                    if b.a is None or b.g is None
                ]
                raise RuntimeError(
                    "two-level K-FAC: the coarse level needs the latest statistics of every "
                    f"layer; none for {missing} (hooks that did not fire this step); refusing "
                    "to fall back to plain K-FAC steps silently"
                )
            operator = self.coarse_operator(grads, fine, stats)
        if operator is None or stats is None:
            out = fine if self.omega1 == 1.0 else [self.omega1 * u for u in fine]
        else:
            out = self.combine(grads, fine, operator, stats)
            if self.is_stats_step:
                self._check_share(fine, out)
            if self.combination is not Combination.additive:
                self._count_nondescent(out, grads)
        self._last = {"grads": grads, "fine": fine, "update": out, "operator": operator}
        return out

    def _count_nondescent(self, updates: list[Tensor], grads: list[Tensor]) -> None:
        """Count steps with ⟨Δ, g⟩ <= 0 (possible for deflated/balanced; no host sync)."""
        pairs = zip(updates, grads, strict=True)
        vg = torch.stack([torch.vdot(u.reshape(-1), g.reshape(-1)) for u, g in pairs]).sum()
        flag = (vg <= 0).to(torch.float64)
        self._nondescent = flag if self._nondescent is None else self._nondescent + flag

    def _coarse(
        self, operator: _Operator, mats: list[Tensor], *, dense: bool = True
    ) -> list[Tensor]:
        """Q v = ω2 R0^T C^-1 R0 v per layer (all-ones layers broadcastable unless ``dense``)."""
        coeffs = operator.solver.solve(restrict(operator.bases, mats))
        out = prolong(operator.bases, coeffs, dense=dense)
        return out if self.omega2 == 1.0 else [self.omega2 * m for m in out]

    def _damped_fvp(self, stats: list[LayerStats], mats: list[Tensor]) -> list[Tensor]:
        """(F + λI) v with the mini-batch Fisher of the latest statistics batch."""
        lam = self.damping
        return [f + lam * v for f, v in zip(fisher_vector_product(stats, mats), mats, strict=True)]

    def combine(
        self,
        grads: list[Tensor],
        fine: list[Tensor],
        operator: _Operator,
        stats: list[LayerStats],
    ) -> list[Tensor]:
        """Combine the fine solve K^-1 g and the coarse operator Q by `combination`."""
        w1 = self.omega1
        if self.combination is Combination.additive:
            coarse = self._coarse(operator, grads, dense=False)
            return [w1 * u + c if w1 != 1.0 else u + c for u, c in zip(fine, coarse, strict=True)]
        if self.combination is Combination.deflated:
            base = [w1 * u for u in fine] if w1 != 1.0 else fine
        else:
            pre = self._coarse(operator, grads)
            fpre = self._damped_fvp(stats, pre)
            rest = super().precondition([g - f for g, f in zip(grads, fpre, strict=True)])
            base = [w1 * u for u in rest] if w1 != 1.0 else rest
        fbase = self._damped_fvp(stats, base)
        corr = self._coarse(operator, [g - f for g, f in zip(grads, fbase, strict=True)])
        return [u + c for u, c in zip(base, corr, strict=True)]

    # ------------------------------------------------------------------ state
    def curvature_state_dict(self) -> dict[str, Any]:
        """K-FAC's curvature state plus the running coarse statistics and the built operator."""
        state = super().curvature_state_dict()
        operator = None
        if self._operator is not None and not self.strategy.gradient_dependent:
            operator = {
                "bases": [
                    {"ones_scale": b.ones_scale, "vectors": b.vectors, "shape": b.shape}
                    for b in self._operator.bases
                ],
                "eigenvalues": self._operator.solver.eigenvalues,
                "eigenvectors": self._operator.solver.eigenvectors,
                "fisher": self._operator.fisher,
            }
        state["coarse"] = {
            "moments": self._moments,
            "exact_fisher": self._exact_fisher,
            "updates": self.coarse_updates,
            "stale": self._stale,
            "operator": operator,
            "nondescent": self._nondescent,
            "accumulated": self._accumulated,
            "accumulated_fisher": self._accumulated_fisher,
            "refresh_due": self._refresh_due,
            "extreme": [self.coarse_extreme_share, self.coarse_extreme_cond],
        }
        return state

    def load_curvature_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `curvature_state_dict` saved."""
        super().load_curvature_state_dict(state)
        coarse = state.get("coarse")
        if coarse is None:
            self._stale = True
            return
        device = self.blocks[0].weight.device if self.blocks else torch.device("cpu")

        def move(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.to(device).clone()

        moments = coarse["moments"]
        self._moments = None if moments is None else (move(moments[0]), move(moments[1]))  # type: ignore[assignment]
        self._exact_fisher = move(coarse["exact_fisher"])
        self.coarse_updates = int(coarse["updates"])
        self._stale = bool(coarse["stale"])
        self._nondescent = move(coarse.get("nondescent"))
        self._accumulated = move(coarse.get("accumulated"))
        self._accumulated_fisher = move(coarse.get("accumulated_fisher"))
        self._refresh_due = bool(coarse.get("refresh_due", True))
        extreme = coarse.get("extreme", [0, 0])
        self.coarse_extreme_share, self.coarse_extreme_cond = int(extreme[0]), int(extreme[1])
        op = coarse["operator"]
        self._operator = None
        if op is not None:
            bases = [
                LayerBasis(
                    shape=(int(b["shape"][0]), int(b["shape"][1])),
                    ones_scale=b["ones_scale"],
                    vectors=move(b["vectors"]),
                )
                for b in op["bases"]
            ]
            solver = CoarseSolver.from_eigen(
                op["eigenvalues"].to(device).clone(), op["eigenvectors"].to(device).clone()
            )
            self._operator = _Operator(bases=bases, solver=solver, fisher=op["fisher"].to(device))
        elif not self.strategy.gradient_dependent:
            self._stale = True

    # ------------------------------------------------------------------ diagnostics
    def diagnostics(self, *, dense_fisher: Tensor | None = None) -> dict[str, float]:
        """K-FAC's scalars plus curvature diagnostics of the latest step (small models only).

        Against the exact damped natural gradient d* = (F + λI)^-1 g (F the mini-batch Fisher of
        the latest statistics batch over the K-FAC layers, or ``dense_fisher`` when given):
        cosines of the K-FAC and two-level updates with d*; their relative errors in the energy
        norm ‖e‖_{F_λ} / ‖d*‖_{F_λ}; `coarse_energy_gain` = (m(K^-1 g) − m(P^-1 g)) / |m(d*)|
        with the quadratic model m(d) = −gᵀd + ½ dᵀF_λ d (the fraction of the best decrease the
        coarse correction adds); the coarse matrix condition number; and the relative Frobenius
        error of F_c against R0 F R0ᵀ of that batch. Per-example gradients are formed from the
        captured (ā, g) (B × N); skipped when B·N > DIAGNOSTICS_MAX_ENTRIES. Always reported:
        `coarse_cond` and `nondescent_steps` (steps so far with ⟨Δ, g⟩ <= 0; deflated/balanced).
        """
        out = super().diagnostics()
        out["nondescent_steps"] = 0.0 if self._nondescent is None else float(self._nondescent)
        out["coarse_extreme_share"] = float(self.coarse_extreme_share)
        out["coarse_extreme_cond"] = float(self.coarse_extreme_cond)
        last, stats = self._last, self.layer_stats()
        if last is None or stats is None:
            return out
        operator: _Operator | None = last["operator"]
        if operator is not None:
            out["coarse_cond"] = operator.solver.condition_number()
        batch = stats[0].a.shape[0]
        size = sum(b.shape[0] * b.shape[1] for b in self.blocks)
        if dense_fisher is None and batch * size > DIAGNOSTICS_MAX_ENTRIES:
            return out
        jac = torch.cat(
            [torch.einsum("bpo,bpi->boi", st.g, st.a).flatten(1).double() for st in stats], dim=1
        )
        grad = torch.cat([g.reshape(-1) for g in last["grads"]]).double()
        lam = self.damping
        natural = _damped_solve(jac, grad, lam, dense_fisher)

        def fisher_apply(vec: Tensor) -> Tensor:
            if dense_fisher is not None:
                return dense_fisher.double() @ vec + lam * vec
            return jac.T @ (jac @ vec) / batch + lam * vec

        def model(vec: Tensor) -> float:
            return float(-grad @ vec + 0.5 * vec @ fisher_apply(vec))

        def energy(vec: Tensor) -> float:
            return float(vec @ fisher_apply(vec)).__abs__() ** 0.5

        best = energy(natural)
        for key, mats in (("kfac", last["fine"]), ("twolevel", last["update"])):
            vec = torch.cat([m.reshape(-1) for m in mats]).double()
            out[f"cos_{key}"] = float(
                torch.nn.functional.cosine_similarity(vec, natural, dim=0, eps=1e-30)
            )
            out[f"energy_err_{key}"] = energy(vec - natural) / best if best > 0 else math.nan
        fine = torch.cat([m.reshape(-1) for m in last["fine"]]).double()
        update = torch.cat([m.reshape(-1) for m in last["update"]]).double()
        optimum = model(natural)
        out["coarse_energy_gain"] = (
            (model(fine) - model(update)) / abs(optimum) if optimum != 0 else math.nan
        )
        if operator is not None and dense_fisher is None:
            proj = per_example_projections(stats, operator.bases).double()
            exact = proj.T @ proj / batch
            denom = float(exact.norm())
            diff = float((operator.fisher.double() - exact).norm())
            out["coarse_fisher_rel_err"] = diff / denom if denom > 0 else math.nan
        return out


def _damped_solve(jac: Tensor, grad: Tensor, lam: float, dense: Tensor | None) -> Tensor:
    """(F + λI)^-1 g with F = JᵀJ/B (Woodbury, B × B system) or a given dense F."""
    if dense is not None:
        eye = torch.eye(dense.shape[0], dtype=torch.float64, device=dense.device)
        return torch.linalg.solve(dense.double() + lam * eye, grad)
    batch = jac.shape[0]
    small = jac @ jac.T + batch * lam * torch.eye(batch, dtype=jac.dtype, device=jac.device)
    return (grad - jac.T @ torch.linalg.solve(small, jac @ grad)) / lam


def build_kfac2(model: nn.Module, cfg: Any) -> TwoLevelKFAC:
    """Two-level K-FAC over ``model`` with the settings of ``cfg`` (config or DictConfig)."""
    return TwoLevelKFAC.from_config(model, cfg)
