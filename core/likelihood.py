"""Negative log-likelihood losses and their predictive samplers (REFERENCE §2 conventions).

Sequence outputs (categorical only): logits (B, T..., V) with the class dimension LAST and
integer targets (B, T...); positions whose target equals ``ignore_index`` contribute nothing. The
per-example loss reduces over the positions as the caller says (`PositionReduction`, required
when there are positions): ``sum`` (the sequence's log-likelihood) or ``mean`` (over its T_n kept
positions). K-FAC's Fisher follows the reduction (see `sequence_terms`).
"""

from __future__ import annotations

from enum import Enum

import torch
import torch.nn.functional as F
from torch import Tensor

IGNORE_INDEX = -100  # torch's default ignore_index of cross_entropy


class PositionReduction(str, Enum):
    """How a per-example loss over several output positions reduces them."""

    sum = "sum"  # l_n = Σ_t ℓ_nt (log-likelihood of the whole sequence)
    mean = "mean"  # l_n = (1/T_n) Σ_t ℓ_nt over the T_n positions not ignored


class Likelihood(str, Enum):
    """Output distribution of a model; fixes both its loss and its Monte-Carlo Fisher sampler."""

    bernoulli = "bernoulli"  # logits; BCE-with-logits summed over outputs
    gaussian = "gaussian"  # mean with unit variance; 0.5 * ||x_hat - x||^2 summed over outputs
    categorical = "categorical"  # logits over classes; cross-entropy

    def _check_positions(self, output: Tensor, positions: PositionReduction | None) -> bool:
        """Whether the output has sequence positions (categorical (B, T..., V)); validates."""
        if self is not Likelihood.categorical:
            if positions is PositionReduction.mean:
                raise ValueError(
                    f"positions: 'mean' applies to the categorical likelihood only; {self.value} "
                    "sums over its output dimensions"
                )
            return False
        if output.dim() <= 2:
            return False
        if positions is None:
            raise ValueError(
                f"positions: categorical logits of shape {tuple(output.shape)} have positions "
                "(class dimension last); say how the per-example loss reduces them: "
                "positions='sum' or 'mean'"
            )
        return True

    def per_example_nll(
        self,
        output: Tensor,
        target: Tensor,
        *,
        positions: PositionReduction | str | None = None,
        ignore_index: int = IGNORE_INDEX,
    ) -> Tensor:
        """Per-example negative log-likelihood, summed over all output dimensions; shape (B,).

        Categorical (B, T..., V) logits: per-position cross-entropy reduced by ``positions``.
        """
        batch = output.shape[0]
        reduce = None if positions is None else PositionReduction(positions)
        if self is Likelihood.bernoulli:
            self._check_positions(output, reduce)
            nll = F.binary_cross_entropy_with_logits(output, target, reduction="none")
            return nll.reshape(batch, -1).sum(dim=1)
        if self is Likelihood.gaussian:
            self._check_positions(output, reduce)
            return 0.5 * (output - target).pow(2).reshape(batch, -1).sum(dim=1)
        if not self._check_positions(output, reduce):
            return F.cross_entropy(output, target, reduction="none", ignore_index=ignore_index)
        if target.shape != output.shape[:-1]:
            raise ValueError(
                f"target: shape {tuple(target.shape)} must be the logits' {tuple(output.shape)} "
                "without the class dimension (last)"
            )
        classes = output.shape[-1]
        per = F.cross_entropy(
            output.reshape(-1, classes),
            target.reshape(-1),
            reduction="none",
            ignore_index=ignore_index,
        ).reshape(batch, -1)
        if reduce is PositionReduction.sum:
            return per.sum(dim=1)
        kept = (target != ignore_index).reshape(batch, -1).sum(dim=1)
        return per.sum(dim=1) / kept.clamp_min(1).to(per.dtype)

    def nll(
        self,
        output: Tensor,
        target: Tensor,
        *,
        positions: PositionReduction | str | None = None,
        ignore_index: int = IGNORE_INDEX,
    ) -> Tensor:
        """Mini-batch loss L = (1/B) sum_n l_n with l_n summed over output dimensions."""
        per = self.per_example_nll(output, target, positions=positions, ignore_index=ignore_index)
        return per.mean()

    def sequence_terms(
        self,
        output: Tensor,
        target: Tensor,
        *,
        positions: PositionReduction | str | None = None,
        ignore_index: int = IGNORE_INDEX,
    ) -> tuple[Tensor | None, Tensor | None]:
        """(kept, counts) for K-FAC's output gradients of a sequence loss; (None, None) else.

        kept (B, T...) marks the positions whose target is not ``ignore_index``. counts (B,) is
        T_n for ``positions='mean'`` (None for 'sum'). The Fisher follows the reduction: with
        l_n = (1/T_n) Σ_t ℓ_nt its Gauss–Newton matrix is (1/T_n) Σ_t J_tᵀ H_t J_t, so a sampled
        output gradient is scaled by 1/√T_n (MC) and the data gradient, which carries 1/T_n,
        by √T_n (empirical): both estimate the same matrix, in the loss's own scale.
        """
        reduce = None if positions is None else PositionReduction(positions)
        if not self._check_positions(output, reduce):
            return None, None
        kept = target != ignore_index
        if reduce is PositionReduction.sum:
            return kept, None
        counts = kept.reshape(target.shape[0], -1).sum(dim=1).clamp_min(1)
        return kept, counts.to(output.dtype)

    def _draw(self, output: Tensor, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
        """The predictive mean (probabilities, or the output) and a target drawn from it."""
        if self is Likelihood.bernoulli:
            # u < p with u ~ U[0, 1) is Bernoulli(p); 3-4x faster than torch.bernoulli on CPU.
            probs = torch.sigmoid(output)
            uniform = torch.rand(
                probs.shape, generator=generator, device=probs.device, dtype=probs.dtype
            )
            return probs, torch.lt(uniform, probs, out=uniform)  # in place: no bool→float copy
        if self is Likelihood.gaussian:
            noise = torch.randn(
                output.shape, generator=generator, device=output.device, dtype=output.dtype
            )
            return output, output + noise
        probs = torch.softmax(output, dim=-1)
        flat = probs.reshape(-1, probs.shape[-1])
        draw = torch.multinomial(flat, 1, generator=generator).reshape(probs.shape[:-1])
        return probs, draw

    def sample(self, output: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
        """Draw targets from the model's predictive distribution (for the MC Fisher)."""
        with torch.no_grad():
            return self._draw(output, generator)[1]

    def sampled_nll_grad(
        self, output: Tensor, *, generator: torch.Generator | None = None
    ) -> Tensor:
        """d/d(output) of the summed NLL at a target drawn as ``sample`` draws it (same stream).

        The closed form (predictive mean − target; one-hot target for classes) spares the MC
        Fisher pass the loss's forward and backward.
        """
        with torch.no_grad():
            mean, target = self._draw(output, generator)
            if self is Likelihood.categorical:
                minus_one = torch.full_like(mean[..., :1], -1.0)
                return mean.scatter_add_(-1, target.unsqueeze(-1), minus_one)
            if self is Likelihood.gaussian:
                return mean - target
            return mean.sub_(target)

    def outputs_per_example(self, output: Tensor) -> int:
        """Number of output dimensions the per-example NLL sums over (1 for classifiers)."""
        if self is Likelihood.categorical:
            return 1
        return int(output[0].numel())
