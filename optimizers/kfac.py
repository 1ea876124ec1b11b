"""K-FAC (Martens & Grosse 2015; KFC for convolutions) as a torch.optim.Optimizer.

The optimizer is built from the model: it finds every supported layer (`optimizers.curvature.
classify`: Linear, Conv1d/Conv2d of any groups, Embedding) whose parameters it trains, gives each a
curvature block and registers a forward hook on it. All other parameters (norms, attention
projections, tied weights, ...) take the plain gradient through the same momentum / weight-decay
update; one KFACCoverageWarning at construction names them and says why. A block whose hooks do not
fire on the first statistics step is an error naming the layer.
One training step (the suite's plain-loop protocol):

    optimizer.zero_grad(set_to_none=True)
    with optimizer.capture():          # records layer inputs/outputs on statistics steps only
        output = model(x)
    loss = likelihood.nll(output, target)    # mean over the batch of per-example NLLs
    optimizer.fisher_backward(output, likelihood=likelihood, target=target)
    loss.backward()
    optimizer.step(closure)            # closure() -> batch loss; only adaptive damping uses it

Statistics steps are those with step % cov_period == 0 (counting from 0); on the others
`capture` and `fisher_backward` do nothing. On a statistics step `capture` keeps the inputs of the
first ⌈stats_fraction·B⌉ examples; `fisher_backward` then, for the MC Fisher, samples targets
from the model's predictive distribution (`Likelihood.sample`, seeded generator owned by the
optimizer and saved in its state) and back-propagates their summed NLL to the layer outputs only
(`torch.autograd.grad`, no parameter gradient is touched); for the empirical Fisher it does
nothing and tensor hooks read the output gradients during `loss.backward()` (multiplied by B,
as the loss is a batch mean). `step` folds them into the running factors and then releases them
(`release_statistics`; kept inputs are views that would pin a batch of activations until the next
statistics step). Inverses are refreshed on steps with step % inv_period == 0.

Update (docs/method.md §3.5): Δ_i = K_i^-1 ∇_i per block (`precondition`, the subclass hook of
two-level K-FAC), ν = min(1, sqrt(κ / (η² Σ_i ⟨Δ_i, ∇_i⟩))) over the blocks (KL clip; None = off; as
in the authors' code ν scales the preconditioned blocks only), d = νΔ + wd·θ (Δ = ∇ for plain
parameters), buf = μ·buf + d, θ ← θ − η·buf. lr, momentum, weight_decay, damping and kl_clip live in
param_groups, so LR schedulers work and the state dict carries them.

Adaptive damping (Levenberg–Marquardt, Martens & Grosse 2015 §6.5): every damping_period steps
ρ = (h(θ + δ) − h(θ)) / M(δ) with h = batch loss + (wd/2)‖θ‖², δ the step actually taken and
M(δ) = ⟨∇h, δ⟩ + ½ δᵀ(F̃ + λI)δ, where F̃ is the K-FAC approximation itself (block-diagonal
A ⊗ G on the preconditioned layers, 0 on plain parameters); h(θ) comes from `fisher_backward`
(or an extra closure call), h(θ + δ) from the closure. ρ < 1/4 → λ ← λ/ω, ρ > 3/4 → λ ← ω·λ with
ω = damping_decay ** damping_period (M&G: (19/20)^5). A new λ re-damps the current inverses at
once (eigen: rescaling only; factored: new Cholesky factors of the current A, G).

Extension points for subclasses (two-level K-FAC): `precondition(grads)`, `update_statistics()`,
`release_statistics()`, `update_inverses()`, `refresh_damping()`, `curvature_state_dict()` /
`load_curvature_state_dict()`; `blocks` lists the curvature blocks in module order.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields, replace
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

from core.errors import ConfigError
from core.likelihood import IGNORE_INDEX, Likelihood, PositionReduction
from core.settings import bounded, check_settings, parse_enum, settings_from
from optimizers.curvature import KFACBlock, classify, ema_decay
from optimizers.distributed import DataParallel, data_parallel_for
from optimizers.enums import DampingMode, FisherType

# Bounds of the adaptively adjusted damping λ.
DAMPING_MIN = 1.0e-8
DAMPING_MAX = 1.0e8
# Levenberg–Marquardt thresholds on the reduction ratio ρ.
RHO_LOW = 0.25
RHO_HIGH = 0.75

# (parameter, its update direction Δ, the KL scale ν applied to Δ or None).
Direction = tuple[Tensor, Tensor, Tensor | None]


@dataclass
class KFACConfig:
    """K-FAC settings (docs/method.md §3): each default and allowed range is written here once.

    Defaults are the two-level authors' (T_cov 10, T_inv 100). Building the dataclass checks every
    range and parses enum values given as strings (`core.settings.check_settings`).
    """

    name: str = "kfac"
    lr: float = bounded(0.01, ge=0)  # learning rate η (0 leaves the parameters unchanged)
    momentum: float = bounded(0.9, ge=0, lt=1)  # heavy-ball momentum μ
    weight_decay: float = bounded(0.0, ge=0)  # wd, added to the preconditioned direction
    damping: float = bounded(1.0e-3, gt=0)  # Tikhonov damping λ (initial value when adaptive)
    damping_mode: DampingMode = DampingMode.eigen  # eigen | factored | factored_unit
    fixed_pi: float = bounded(1.0, gt=0)  # π of factored_unit: A + π√λ I, G + (√λ/π) I
    fisher: FisherType = FisherType.mc  # mc | empirical
    ema_max: float = bounded(0.95, ge=0, lt=1)  # running-average cap ε_max
    cov_period: int = bounded(10, ge=1, integer=True)  # statistics every T_cov steps
    inv_period: int = bounded(100, ge=1, integer=True)  # inverses every T_inv steps
    stats_fraction: float = bounded(1.0, gt=0, le=1)  # statistics on the first ⌈fraction·B⌉
    kl_clip: float | None = bounded(1.0e-2, gt=0, null="off")  # κ of the KL clip
    adaptive_damping: bool = False  # Levenberg–Marquardt adaptation of λ
    damping_period: int = bounded(5, ge=1, integer=True)  # adapt λ every this many steps
    damping_decay: float = bounded(0.95, gt=0, lt=1)  # per-step ω; λ changes by ω^damping_period
    seed: int | None = bounded(None, integer=True, null="torch.initial_seed()")  # MC sampling seed
    grad_accumulation: int = bounded(1, ge=1, integer=True)  # micro-batches per step; stats summed

    def __post_init__(self) -> None:
        check_settings(self)
        if self.fixed_pi != 1.0 and self.damping_mode is not DampingMode.factored_unit:
            raise ConfigError(
                "fixed_pi",
                f"{self.fixed_pi:g} applies to damping_mode factored_unit only (got "
                f"{self.damping_mode.value}, whose π is {_PI_OF[self.damping_mode]}); "
                "leave it at 1",
            )


# What π is in each damping mode (for the fixed_pi error message).
_PI_OF = {DampingMode.eigen: "not used", DampingMode.factored: "from the factor traces"}


@dataclass
class KFACCounters:
    """Step counters and numerical incidents (saved with the curvature state)."""

    steps: int = 0  # optimizer steps taken
    stats_updates: int = 0  # statistics steps taken
    inverse_updates: int = 0  # inverse refreshes
    damping_updates: int = 0  # adaptive-damping decisions
    nonfinite_stats: int = 0  # block statistics skipped because they were not finite
    linalg_retries: int = 0  # factorisations that needed the float64 retry (or failed)
    missing_stats: int = 0  # block statistics missing on a later statistics step (hook idle)


class KFACCoverageWarning(UserWarning):
    """Some trainable parameters take the plain (non-preconditioned) update."""


_COMPILE_MESSAGE = (
    "KFAC.capture: a K-FAC layer hook was traced into a torch.compile graph, where it cannot "
    "record statistics; run the captured forward on the uncompiled model"
)

# Per-group settings a param group may carry; damping and kl_clip are global (group 0's).
GROUP_KEYS = ("params", "lr", "momentum", "weight_decay")


def _is_compiled(model: nn.Module) -> bool:
    """Whether the model is a torch.compile wrapper (OptimizedModule)."""
    return type(model).__name__ == "OptimizedModule" and hasattr(model, "_orig_mod")


def _check(condition: bool, setting: str, value: object, allowed: str) -> None:
    if not condition:
        raise ValueError(f"{setting}: got {value!r}; allowed: {allowed}")


class KFAC(torch.optim.Optimizer):
    """K-FAC with Kronecker-factored layer blocks; see the module docstring.

    ``param_groups`` (optional): torch.optim group dicts over the model's parameters with
    per-group lr / momentum / weight_decay; parameters outside every group are not trained.
    """

    config_type: type[KFACConfig] = KFACConfig

    def __init__(
        self,
        model: nn.Module,
        config: KFACConfig | None = None,
        *,
        param_groups: list[dict[str, Any]] | None = None,
        **settings: Any,
    ) -> None:
        """K-FAC over ``model`` with ``config`` (default: `KFACConfig()`), single fields replaced by
        ``settings`` (``KFAC(model, lr=0.1)``); an invalid value raises a one-line ConfigError."""
        if not isinstance(model, nn.Module):
            raise TypeError(
                f"KFAC(model, ...): model must be the nn.Module to precondition (K-FAC hooks its "
                f"layers), got {type(model).__name__}; pass per-group settings as "
                "param_groups=[{'params': [...], 'lr': ...}, ...]"
            )
        if _is_compiled(model):  # torch.compile wrapper: hook the layers it wraps
            model = model._orig_mod  # type: ignore[assignment]
        base = self.config_type() if config is None else config
        cfg = replace(base, **settings)  # re-runs the checks of __post_init__
        self.config = cfg
        params: list[Any]
        if param_groups is None:
            params = [p for p in model.parameters() if p.requires_grad]
        else:
            params = [dict(group) for group in param_groups]
        if not params:
            raise ValueError("KFAC: the model has no trainable parameters")
        defaults = {
            "lr": cfg.lr,
            "momentum": cfg.momentum,
            "weight_decay": cfg.weight_decay,
            "damping": cfg.damping,
            "kl_clip": cfg.kl_clip,
        }
        super().__init__(params, defaults)
        self.damping_mode = cfg.damping_mode
        self.fixed_pi = float(cfg.fixed_pi)
        self.fisher = cfg.fisher
        self.ema_max = float(cfg.ema_max)
        self.cov_period = cfg.cov_period
        self.inv_period = cfg.inv_period
        self.stats_fraction = float(cfg.stats_fraction)
        self.adaptive_damping = bool(cfg.adaptive_damping)
        self.damping_period = cfg.damping_period
        self.damping_decay = float(cfg.damping_decay)
        self.seed = int(torch.initial_seed() if cfg.seed is None else cfg.seed)
        self.counters = KFACCounters()

        self.grad_accumulation = cfg.grad_accumulation
        self.model_names = {id(p): name for name, p in model.named_parameters()}
        self.blocks: list[KFACBlock] = []
        self.block_names: list[str] = []
        fallbacks = self._build_blocks(model)
        self._check_block_groups()
        in_blocks = {id(p) for block in self.blocks for p in block.params}
        self.plain_params: list[Tensor] = [
            p for group in self.param_groups for p in group["params"] if id(p) not in in_blocks
        ]
        if fallbacks:
            inits = sum(  # subclass constructors between the caller and this one
                1
                for cls in type(self).__mro__
                if cls is not KFAC and issubclass(cls, KFAC) and "__init__" in cls.__dict__
            )
            warnings.warn(
                "KFAC: these trainable parameters take the plain (non-preconditioned) update: "
                + " | ".join(fallbacks),
                KFACCoverageWarning,
                stacklevel=2 + inits,
            )
        self._hooks = [
            block.module.register_forward_hook(partial(self._forward_hook, index))
            for index, block in enumerate(self.blocks)
        ]
        self._capturing = False
        self._outputs: dict[int, list[tuple[Tensor, int]]] = {}
        self._micro = 0  # micro-batches captured in this step
        self._row_scale: dict[int, Tensor] = {}  # per-example output-gradient factors per micro
        self._mc_done = False
        self._loss_before: Tensor | None = None
        self._generator: torch.Generator | None = None
        self._pending_generator: tuple[str, Tensor] | None = None
        self.last_nu: Tensor | None = None
        self.last_rho: float | None = None
        # Data-parallel strategy (optimizers.distributed) when torch.distributed runs several
        # ranks; None in a single process. Refuses an unwrapped model or unsupported settings.
        self.data_parallel: DataParallel | None = data_parallel_for(
            model, what=type(self).__name__, unsupported=self.data_parallel_unsupported()
        )

    def data_parallel_unsupported(self) -> list[str]:
        """Settings that read rank-local data and so cannot run data-parallel (empty: none)."""
        if self.adaptive_damping:
            return ["adaptive_damping=true (its reduction ratio compares rank-local losses)"]
        return []

    @classmethod
    def from_config(cls, model: nn.Module, cfg: Any) -> Any:
        """Built from a config of ``cls.config_type`` or any object with its fields (DictConfig)."""
        return cls(model, settings_from(cls.config_type, cfg))

    # ----------------------------------------------------------------- coverage
    def _build_blocks(self, model: nn.Module) -> list[str]:
        """Blocks for the supported layers whose parameters this optimizer trains.

        Returns one line per layer whose trainable parameters fall back to the plain update.
        """
        optimized = {id(p) for group in self.param_groups for p in group["params"]}
        parents = {id(child): parent for parent in model.modules() for child in parent.children()}
        fallbacks: dict[str, list[str]] = {}  # reason -> parameters
        candidates: list[tuple[str, KFACBlock]] = []
        for name, module in model.named_modules():
            own = [p for p in module.parameters(recurse=False) if id(p) in optimized]
            if not own:
                continue
            block, why = classify(module)
            if isinstance(parents.get(id(module)), nn.MultiheadAttention):
                block, why = None, "inside MultiheadAttention, whose forward never calls it"
            if block is not None and not all(id(p) in optimized for p in block.params):
                block, why = None, "only part of its parameters are given to the optimizer"
            if block is None:
                kind = type(module).__name__
                fallbacks.setdefault(f"{kind}: {why}", []).extend(self._param_name(p) for p in own)
                continue
            candidates.append((name, block))
        owners: dict[int, list[str]] = {}
        for name, block in candidates:
            for p in block.params:
                owners.setdefault(id(p), []).append(name)
        for name, block in candidates:
            shared = sorted({o for p in block.params for o in owners[id(p)] if o != name})
            if shared:
                why = "parameter shared between layers (weight tying; one tensor, one update)"
                fallbacks.setdefault(why, []).extend(self._param_name(p) for p in block.params)
                continue
            self.blocks.append(block)
            self.block_names.append(name)
        return [f"{why}: {', '.join(dict.fromkeys(names))}" for why, names in fallbacks.items()]

    def _param_name(self, param: Tensor) -> str:
        name = self.model_names.get(id(param))
        return name if name is not None else f"<tensor {tuple(param.shape)}>"

    def _group_of(self) -> dict[int, dict[str, Any]]:
        return {id(p): group for group in self.param_groups for p in group["params"]}

    def _check_block_groups(self) -> None:
        groups = self._group_of()
        for name, block in zip(self.block_names, self.blocks, strict=True):
            if len({id(groups[id(p)]) for p in block.params}) > 1:
                raise ValueError(
                    f"param_groups: layer '{name}' has its weight and bias in different groups; "
                    "a K-FAC block takes one lr/momentum/weight_decay (put them in one group)"
                )

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """torch.optim's add_param_group; keys limited to GROUP_KEYS (damping, kl_clip global).

        Parameters added after construction take the plain update (a KFACCoverageWarning says
        which); they are updated like the rest with their group's lr, momentum and weight decay.
        """
        unknown = sorted(set(param_group) - set(GROUP_KEYS) - {"damping", "kl_clip"})
        if unknown:
            raise ValueError(
                f"param_groups: unknown key(s) {unknown}; allowed per group: "
                f"{', '.join(GROUP_KEYS)}"
            )
        for key in ("damping", "kl_clip"):
            if key in param_group and param_group[key] != self.defaults[key]:
                raise ValueError(
                    f"param_groups: {key} is a global setting, not per group; set KFAC({key}=...)"
                )
        for key, low in (("lr", "lr >= 0"), ("momentum", "0 <= momentum < 1")):
            if key in param_group:
                value = float(param_group[key])
                ok = value >= 0 and (key != "momentum" or value < 1) and math.isfinite(value)
                _check(ok, f"param_groups.{key}", value, low)
        if "weight_decay" in param_group:
            wd = float(param_group["weight_decay"])
            _check(wd >= 0, "param_groups.weight_decay", wd, "a number >= 0")
        super().add_param_group(param_group)
        if hasattr(self, "blocks"):
            new = list(self.param_groups[-1]["params"])
            self.plain_params.extend(new)
            warnings.warn(
                "KFAC.add_param_group: parameters added after construction take the plain "
                "(non-preconditioned) update: " + ", ".join(self._param_name(p) for p in new),
                KFACCoverageWarning,
                stacklevel=2,
            )

    # ----------------------------------------------------------------- schedule
    @property
    def damping(self) -> float:
        """Current damping λ (param_groups[0]['damping'])."""
        return float(self.param_groups[0]["damping"])

    @property
    def is_stats_step(self) -> bool:
        """Whether the coming step updates the curvature statistics."""
        return self.counters.steps % self.cov_period == 0

    @property
    def is_inverse_step(self) -> bool:
        """Whether the coming step refreshes the damped inverses."""
        return self.counters.steps % self.inv_period == 0

    @property
    def is_damping_step(self) -> bool:
        """Whether the coming step adapts the damping (adaptive damping only)."""
        return self.adaptive_damping and self.counters.steps % self.damping_period == 0

    def stats_rows(self, batch: int) -> int:
        """Number of leading examples whose statistics are used: ⌈stats_fraction·B⌉."""
        return min(batch, max(1, math.ceil(round(self.stats_fraction * batch, 6))))

    def describe(self) -> str:
        """One line: blocks, plain parameters and the curvature settings."""
        kinds: dict[str, int] = {}
        for block in self.blocks:
            kinds[block.kind] = kinds.get(block.kind, 0) + 1
        layers = ", ".join(f"{n} {k}" for k, n in kinds.items()) or "none"
        return (
            f"K-FAC: blocks {layers}; {len(self.plain_params)} plain parameter tensors; "
            f"fisher={self.fisher.value}, damping={self.damping_mode.value} λ={self.damping:g}"
            f"{' (adaptive)' if self.adaptive_damping else ''}, T_cov={self.cov_period}, "
            f"T_inv={self.inv_period}, stats_fraction={self.stats_fraction:g}"
        )

    # ----------------------------------------------------------------- capture
    @contextmanager
    def capture(self) -> Iterator[None]:
        """Record layer inputs/outputs of the forward pass inside, on statistics steps only.

        With grad_accumulation = k, up to k captured forwards (micro-batches) per step add up.
        """
        self._outputs = {}
        self._mc_done = False
        if self._micro == 0:
            self._loss_before = None
        if not self.is_stats_step:
            yield
            return
        if self._micro >= self.grad_accumulation:
            raise RuntimeError(
                f"KFAC.capture: {self._micro + 1} captured forwards in one step but "
                f"grad_accumulation={self.grad_accumulation}; capture each micro-batch once "
                "and call step() after the last (or raise grad_accumulation)"
            )
        if self._micro == 0:
            for block in self.blocks:
                block.clear_stats()
            self._row_scale = {}
        self._capturing = True
        try:
            if torch.compiler.is_compiling():
                raise RuntimeError(_COMPILE_MESSAGE)
            yield
        finally:
            self._capturing = False
            self._micro += 1

    def _forward_hook(self, index: int, module: nn.Module, inputs: Any, output: Tensor) -> None:
        if not self._capturing:
            return
        if torch.compiler.is_compiling():
            raise RuntimeError(_COMPILE_MESSAGE)
        block = self.blocks[index]
        if not isinstance(output, Tensor) or not output.requires_grad:
            if not any(p.requires_grad for p in block.params):
                return  # frozen after construction: nothing to precondition
            raise RuntimeError(
                f"KFAC.capture: the output of layer '{self.block_names[index]}' does not require "
                "gradients; do not run the captured forward under torch.no_grad()"
            )
        calls = self._outputs.setdefault(index, [])
        call, micro = len(calls), self._micro
        x = inputs[0]
        batch = int(x.shape[0])
        rows = self.stats_rows(batch)
        block.save_input(x, rows=rows, micro=micro, call=call)
        block.save_output(output, call=call)
        calls.append((output, output._version))
        if self.fisher is FisherType.empirical:
            scale = float(batch * self.grad_accumulation)
            output.register_hook(partial(self._empirical_hook, block, rows, scale, micro, call))

    def _empirical_hook(
        self, block: KFACBlock, rows: int, scale: float, micro: int, call: int, grad: Tensor
    ) -> None:
        """g = B·k · ∂(loss/k)/∂s, times √T_n per example for a per-position mean loss."""
        extra = self._row_scale.get(micro)
        factor: float | Tensor = scale if extra is None else extra[:rows] * scale
        block.save_output_grad(grad, rows=rows, scale=factor, micro=micro, call=call)

    def _mc_generator(self, device: torch.device) -> torch.Generator:
        if self.data_parallel is not None:  # per-rank stream, seeded by (seed, rank, stats step)
            return self.data_parallel.mc_generator(self, device)
        gen = self._generator
        if gen is not None and gen.device == device:
            return gen
        gen = torch.Generator(device=device)
        gen.manual_seed(self.seed)
        if self._pending_generator is not None:
            saved_device, state = self._pending_generator
            if torch.device(saved_device).type == device.type:
                gen.set_state(state)
            else:
                warnings.warn(
                    f"KFAC: MC sampling state saved on {saved_device} cannot be restored on "
                    f"{device}; sampling restarts from seed {self.seed}",
                    RuntimeWarning,
                    stacklevel=3,
                )
            self._pending_generator = None
        self._generator = gen
        return gen

    def fisher_backward(
        self,
        output: Tensor,
        *,
        likelihood: Likelihood | str,
        target: Tensor,
        positions: PositionReduction | str | None = None,
        ignore_index: int = IGNORE_INDEX,
    ) -> None:
        """MC Fisher pass on statistics steps: sampled targets back-propagated to layer outputs.

        No parameter gradient is computed. Empirical Fisher: only the per-position scaling of the
        coming loss.backward() is recorded. ``positions`` and ``ignore_index`` must be those of
        the loss (categorical (B, T..., V) logits; see `Likelihood.sequence_terms`). With
        adaptive damping it also records the batch loss before the update on damping steps.
        """
        lik = parse_enum(Likelihood, likelihood, setting="likelihood")
        kept, counts = lik.sequence_terms(
            output, target, positions=positions, ignore_index=ignore_index
        )
        if self.is_damping_step and self._micro <= 1:
            with torch.no_grad():
                self._loss_before = lik.nll(
                    output.detach(), target, positions=positions, ignore_index=ignore_index
                ).detach()
        if not self.is_stats_step or not self.blocks:
            return
        micro = self._micro - 1
        if self.fisher is FisherType.empirical:
            if counts is not None:
                self._row_scale[micro] = counts.sqrt()
            return
        if not self._outputs:
            raise RuntimeError(
                "KFAC.fisher_backward: nothing was captured on this statistics step; run the "
                "forward inside `with optimizer.capture():`"
            )
        if self._mc_done:
            raise RuntimeError("KFAC.fisher_backward: called twice for one captured forward")
        rows = self.stats_rows(int(output.shape[0]))
        head = output if rows == output.shape[0] else output[:rows]  # a slice costs a backward copy
        head_grad = lik.sampled_nll_grad(head.detach(), generator=self._mc_generator(output.device))
        if kept is not None:
            head_grad = head_grad * kept[:rows].unsqueeze(-1).to(head_grad.dtype)
        if counts is not None:
            shape = (rows,) + (1,) * (head_grad.dim() - 1)
            head_grad = head_grad * counts[:rows].rsqrt().reshape(shape).to(head_grad.dtype)
        keys = [
            (index, call) for index, calls in self._outputs.items() for call in range(len(calls))
        ]
        tensors = []
        for index, call in keys:
            tensor, version = self._outputs[index][call]
            if tensor._version != version:
                raise RuntimeError(
                    f"KFAC.fisher_backward: the output of layer '{self.block_names[index]}' was "
                    "modified in place after the layer ran; use out-of-place activations after "
                    "K-FAC layers"
                )
            tensors.append(tensor)
        grads = torch.autograd.grad(
            head, tensors, grad_outputs=head_grad, retain_graph=True, allow_unused=True
        )
        for (index, call), grad in zip(keys, grads, strict=True):
            if grad is not None:
                self.blocks[index].save_output_grad(grad, rows=rows, micro=micro, call=call)
        self._mc_done = True

    def remove_hooks(self) -> None:
        """Detach the forward hooks from the model (the optimizer cannot capture afterwards)."""
        for handle in self._hooks:
            handle.remove()
        self._hooks = []

    # ----------------------------------------------------------------- curvature stages
    def _check_captured(self) -> None:
        if not self.blocks:
            return
        captured = [block for block in self.blocks if block.inputs is not None]
        if self._micro == 0 or not captured:
            raise RuntimeError(
                f"KFAC.step: step {self.counters.steps} is a statistics step (cov_period="
                f"{self.cov_period}) but nothing was captured; run the forward inside "
                "`with optimizer.capture():`"
            )
        if self._micro != self.grad_accumulation:
            raise RuntimeError(
                f"KFAC.step: {self._micro} captured micro-batch(es) in this step but "
                f"grad_accumulation={self.grad_accumulation}; capture every micro-batch of the "
                "step (each loss divided by grad_accumulation) before step()"
            )
        if all(block.g is None for block in captured):
            how = (
                "call optimizer.fisher_backward(output, likelihood=..., target=...) before step()"
                if self.fisher is FisherType.mc
                else "call loss.backward() on the batch-mean loss before step()"
            )
            raise RuntimeError(f"KFAC.step: no output gradients were captured; {how}")
        missing = [
            f"'{name}' ({type(block.module).__name__}): "
            + ("no input (its forward hook never fired)" if block.inputs is None else
               "no output gradient (its output does not reach the loss)")
            for name, block in zip(self.block_names, self.blocks, strict=True)
            if not block.has_stats and any(p.requires_grad for p in block.params)
        ]  # fmt: skip
        if not missing:
            return
        if self.counters.stats_updates == 0:
            raise RuntimeError(
                "KFAC.step: no statistics for " + "; ".join(missing) + ". Each layer with a "
                "K-FAC block must run its own forward() inside capture() and reach the loss "
                "(layers applied functionally, e.g. by MultiheadAttention, and torch.compile "
                "bypass the hooks); freeze such layers or leave them out of the optimizer"
            )
        self.counters.missing_stats += len(missing)
        warnings.warn(
            f"KFAC: step {self.counters.steps}: no statistics for "
            + "; ".join(missing)
            + "; their factors were left unchanged",
            RuntimeWarning,
            stacklevel=3,
        )

    def update_statistics(self) -> None:
        """Fold the captured statistics into the running factors (ε_k schedule per block)."""
        bad = []
        for index, block in enumerate(self.blocks):
            if not block.has_stats:
                continue
            if not block.update_factors(decay=ema_decay(block.num_updates, self.ema_max)):
                bad.append(index)
        if bad:
            self.counters.nonfinite_stats += len(bad)
            warnings.warn(
                f"KFAC: non-finite statistics at step {self.counters.steps} in blocks {bad}; "
                "their factors were left unchanged",
                RuntimeWarning,
                stacklevel=3,
            )
        self.counters.stats_updates += 1

    def release_statistics(self) -> None:
        """Drop the captured (ā, g) once folded in: they would pin a batch of activations."""
        for block in self.blocks:
            block.clear_stats()

    def update_inverses(self) -> None:
        """Recompute every block's damped inverse from its current factors."""
        if self.data_parallel is not None:
            retries = self.data_parallel.update_inverses(self)
        else:
            retries = 0
            for block in self.blocks:
                if block.num_updates > 0:
                    retries += block.update_inverse(
                        damping=self.damping, mode=self.damping_mode, fixed_pi=self.fixed_pi
                    )
        self._note_retries(retries)
        self.counters.inverse_updates += 1

    def refresh_damping(self) -> None:
        """Apply a changed λ to the current inverses (called by adaptive damping)."""
        retries = 0
        for block in self.blocks:
            if block.has_inverse:
                retries += block.set_damping(self.damping)
        self._note_retries(retries)

    def _note_retries(self, retries: int) -> None:
        if retries:
            self.counters.linalg_retries += retries
            warnings.warn(
                f"KFAC: {retries} factorisation(s) failed at step {self.counters.steps} and were "
                "retried in float64 with jitter",
                RuntimeWarning,
                stacklevel=3,
            )

    def precondition(self, grads: list[Tensor]) -> list[Tensor]:
        """Per-block update matrices from per-block gradient matrices: Δ_i = K_i^-1 ∇_i.

        Blocks without statistics yet pass their gradient through unchanged.
        """
        return [
            block.multiply_inverse(grad) if block.has_inverse else grad
            for block, grad in zip(self.blocks, grads, strict=True)
        ]

    # ----------------------------------------------------------------- step
    def _kl_scale(
        self, updates: list[Tensor], grads: list[Tensor], lrs: list[float]
    ) -> Tensor | None:
        """ν = min(1, sqrt(κ / Σ_i η_i² ⟨Δ_i, ∇_i⟩)) (η_i: the lr of block i's group)."""
        kl_clip = self.param_groups[0]["kl_clip"]
        if kl_clip is None or not updates:
            return None
        pairs = zip(updates, grads, strict=True)
        dots = [torch.vdot(u.reshape(-1), g.reshape(-1)) for u, g in pairs]
        if len(set(lrs)) == 1:
            vg = torch.stack(dots).sum() * (lrs[0] * lrs[0])
        else:
            vg = torch.stack([d * (lr * lr) for d, lr in zip(dots, lrs, strict=True)]).sum()
        ratio = kl_clip / torch.where(vg > 0, vg, torch.ones_like(vg))
        nu = torch.where(vg > 0, torch.sqrt(ratio), torch.ones_like(vg)).clamp(max=1.0)
        self.last_nu = nu
        return nu

    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """One K-FAC step; returns the closure's loss after the update on damping steps.

        As torch.optim: a parameter whose .grad is None is left alone (momentum buffer
        included); lr, momentum and weight_decay are read from each parameter's group.
        """
        if self.is_stats_step:
            try:
                self._check_captured()
            except RuntimeError:
                self._micro = 0  # the step is not taken: the next capture starts afresh
                raise
            if self.data_parallel is not None:  # local fold, then averaged over the ranks
                self.data_parallel.update_statistics(self)
            else:
                self.update_statistics()
            self.release_statistics()
        self._outputs = {}
        self._micro = 0
        if self.is_inverse_step or any(
            b.num_updates > 0 and not b.has_inverse for b in self.blocks
        ):
            self.update_inverses()
        adapt = self.is_damping_step
        if adapt and closure is None:
            raise ValueError("adaptive_damping: step() needs a closure that returns the batch loss")
        loss_before = self._loss_before
        if adapt and loss_before is None:
            assert closure is not None
            with torch.no_grad():
                loss_before = torch.as_tensor(closure()).detach()
        groups = self._group_of()
        with torch.no_grad():
            grads = [block.grad_matrix() for block in self.blocks]
            updates = self.precondition(grads)
            active = [
                i
                for i, block in enumerate(self.blocks)
                if any(p.grad is not None for p in block.params)
            ]
            lrs = [float(groups[id(self.blocks[i].weight)]["lr"]) for i in active]
            nu = self._kl_scale([updates[i] for i in active], [grads[i] for i in active], lrs)
            directions: list[Direction] = []
            for i in active:
                block, update = self.blocks[i], updates[i]
                scale = None if nu is None else nu.to(update.dtype)
                directions.extend(
                    (param, part, scale)
                    for param, part in zip(block.params, block.matrix_to_param_updates(update))
                    if param.grad is not None
                )
            directions.extend((p, p.grad, None) for p in self.plain_params if p.grad is not None)
            model_terms = self._model_terms(directions, grads, groups) if adapt else None
            self._apply(directions, groups)
        result = None
        if adapt and closure is not None and model_terms is not None:
            assert loss_before is not None
            with torch.no_grad():
                loss_after = torch.as_tensor(closure()).detach()
            self._adapt_damping(float(loss_before), float(loss_after), model_terms)
            result = loss_after
        self._loss_before = None
        self.counters.steps += 1
        return result

    @staticmethod
    def _settings(group: dict[str, Any]) -> tuple[float, float, float]:
        return float(group["lr"]), float(group["momentum"]), float(group["weight_decay"])

    def _step_of(self, param: Tensor, direction: Direction, group: dict[str, Any]) -> Tensor:
        """The vector η multiplies: d = ν·Δ + wd·θ through momentum (no side effects)."""
        _, momentum, wd = self._settings(group)
        _, delta, scale = direction
        d = delta if scale is None else delta * scale
        if wd:
            d = d + wd * param
        buf = self.state[param].get("momentum_buffer") if momentum else None
        return d if buf is None else buf * momentum + d

    def _apply(self, directions: list[Direction], groups: dict[int, dict[str, Any]]) -> None:
        """buf ← μ·buf + ν·Δ + wd·θ, θ ← θ − η·buf (ν fused into the update: no scaled copy)."""
        for param, delta, scale in directions:
            lr, momentum, weight_decay = self._settings(groups[id(param)])
            buf = self.state[param].get("momentum_buffer") if momentum else None
            if buf is None:
                d = delta * scale if scale is not None else delta
                if weight_decay:
                    d = d.add(param, alpha=weight_decay)
                if momentum:
                    self.state[param]["momentum_buffer"] = d = d.detach().clone()
                param.add_(d, alpha=-lr)
                continue
            buf.mul_(momentum)
            if scale is None:
                buf.add_(delta)
            else:
                buf.addcmul_(delta, scale)
            if weight_decay:
                buf.add_(param, alpha=weight_decay)
            param.add_(buf, alpha=-lr)

    # ----------------------------------------------------------------- adaptive damping
    def _model_terms(
        self,
        directions: list[Direction],
        grads: list[Tensor],
        groups: dict[int, dict[str, Any]],
    ) -> dict[str, float]:
        """Pieces of M(δ) for the step δ = −η·(buffer) about to be taken (float64 scalars)."""
        deltas = {
            id(d[0]): -float(groups[id(d[0])]["lr"]) * self._step_of(d[0], d, groups[id(d[0])])
            for d in directions
        }
        linear, square, wd_change, curvature = 0.0, 0.0, 0.0, 0.0
        for block, grad in zip(self.blocks, grads, strict=True):
            if not all(id(p) in deltas for p in block.params):
                continue
            mat = block.params_to_matrix([deltas[id(p)] for p in block.params])
            linear += float((grad.double() * mat.double()).sum())
            if block.num_updates > 0:
                curvature += float((mat.double() * block.multiply_factors(mat).double()).sum())
        for param in self.plain_params:
            if id(param) in deltas and param.grad is not None:
                linear += float((param.grad.double() * deltas[id(param)].double()).sum())
        for param, _, _ in directions:
            delta = deltas[id(param)].double()
            sq = float((delta * delta).sum())
            square += sq
            wd = float(groups[id(param)]["weight_decay"])
            if wd:
                wd_change += wd * (float((param.double() * delta).sum()) + 0.5 * sq)
        return {"linear": linear, "curvature": curvature, "square": square, "wd": wd_change}

    def _adapt_damping(
        self, loss_before: float, loss_after: float, terms: dict[str, float]
    ) -> None:
        """Levenberg–Marquardt rule on ρ = actual / predicted change of h."""
        lam = self.damping
        wd_change = terms["wd"]
        predicted = (
            terms["linear"] + 0.5 * terms["curvature"] + 0.5 * lam * terms["square"] + wd_change
        )
        actual = loss_after - loss_before + wd_change
        rho = actual / predicted if predicted < 0 and math.isfinite(actual) else -math.inf
        omega = self.damping_decay**self.damping_period
        new = lam
        if rho < RHO_LOW:
            new = lam / omega
        elif rho > RHO_HIGH:
            new = lam * omega
        new = min(max(new, DAMPING_MIN), DAMPING_MAX)
        self.last_rho = rho
        self.counters.damping_updates += 1
        if new != lam:
            for group in self.param_groups:
                group["damping"] = new
            self.refresh_damping()

    # ----------------------------------------------------------------- state
    def curvature_state_dict(self) -> dict[str, Any]:
        """Counters, block factors and inverses, and the MC sampling state."""
        if self._generator is not None:
            gen_device: str | None = str(self._generator.device)
            gen_state: Tensor | None = self._generator.get_state()
        elif self._pending_generator is not None:
            gen_device, gen_state = self._pending_generator
        else:
            gen_device, gen_state = None, None
        return {
            "counters": asdict(self.counters),
            "blocks": [block.state_dict() for block in self.blocks],
            "generator": {"seed": self.seed, "device": gen_device, "state": gen_state},
            "settings": {"damping_mode": self.damping_mode.value, "fisher": self.fisher.value},
        }

    def load_curvature_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `curvature_state_dict` saved."""
        if len(state["blocks"]) != len(self.blocks):
            raise ValueError(
                f"K-FAC state: {len(state['blocks'])} curvature blocks saved, the model has "
                f"{len(self.blocks)}"
            )
        for block, block_state in zip(self.blocks, state["blocks"], strict=True):
            block.load_state_dict(block_state)
        names = {f.name for f in fields(KFACCounters)}
        self.counters = KFACCounters(
            **{k: int(v) for k, v in state["counters"].items() if k in names}
        )
        gen = state["generator"]
        self.seed = int(gen["seed"])
        self._generator = None
        self._pending_generator = (
            None if gen["state"] is None else (str(gen["device"]), gen["state"].clone())
        )

    def state_dict(self) -> dict[str, Any]:
        """torch.optim state (momentum buffers, param_groups) plus the curvature state."""
        state = super().state_dict()
        state["curvature"] = self.curvature_state_dict()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Inverse of `state_dict`; continuing afterwards repeats the original run exactly."""
        state = dict(state_dict)
        curvature = state.pop("curvature", None)
        super().load_state_dict(state)
        if curvature is not None:
            self.load_curvature_state_dict(curvature)

    # ----------------------------------------------------------------- diagnostics
    def diagnostics(self) -> dict[str, float]:
        """Scalars worth logging: damping, last KL scale ν and ρ, incident counters."""
        out = {
            "damping": self.damping,
            "nonfinite_stats": float(self.counters.nonfinite_stats),
            "linalg_retries": float(self.counters.linalg_retries),
            "missing_stats": float(self.counters.missing_stats),
        }
        if self.last_nu is not None:
            out["kl_nu"] = float(self.last_nu)
        if self.last_rho is not None:
            out["rho"] = self.last_rho
        return out


def build_kfac(model: nn.Module, cfg: Any) -> KFAC:
    """K-FAC over ``model`` with the settings of ``cfg`` (a KFACConfig or a DictConfig of one)."""
    return KFAC.from_config(model, cfg)
