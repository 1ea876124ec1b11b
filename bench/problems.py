"""The benchmark problems: model, loss, a pool of batches and the layer sizes of the floors."""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass
from enum import Enum
from functools import cache
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import Tensor, nn

from bench.floors import LayerShape, layer_shapes
from core.likelihood import Likelihood
from datasets import DataConfig, load_dataset
from models import build_model

log = logging.getLogger("bench")
CONF_MODEL = Path(__file__).resolve().parent.parent / "conf" / "model"

POOL_BATCHES = 4  # distinct batches cycled through, as a real loop would see
TOY_AE_SIZES = (12, 8, 4, 8, 12)


class ProblemName(str, Enum):
    """Problems the harness can time."""

    MNIST_AE = "mnist_ae"  # MNIST autoencoder, batch 1000, offline real digits
    CNN = "cifar10_3c3d"  # DeepOBS 3c3d CNN on generated 3×32×32 data, batch 128
    TOY = "toy"  # tiny autoencoder for the harness's own tests


class DataKind(str, Enum):
    """Where a problem's batches come from."""

    MNIST = "mnist"  # datasets.load_dataset("mnist") (offline: the real 5,000-digit subset)
    GENERATED = "generated"  # random inputs and labels of the right shape


@dataclass(frozen=True)
class ProblemSpec:
    """How to build one problem."""

    name: ProblemName
    model_preset: str | None  # conf/model preset for models.build_model; None: inline model
    batch: int
    quick_batch: int
    input_shape: tuple[int, ...]
    likelihood: Likelihood
    num_classes: int | None  # None: autoencoder (target = flattened input)
    data: DataKind


SPECS: dict[ProblemName, ProblemSpec] = {
    ProblemName.MNIST_AE: ProblemSpec(
        name=ProblemName.MNIST_AE,
        model_preset="mnist_ae",
        batch=1000,
        quick_batch=200,
        input_shape=(1, 28, 28),
        likelihood=Likelihood.bernoulli,
        num_classes=None,
        data=DataKind.MNIST,
    ),
    ProblemName.CNN: ProblemSpec(
        name=ProblemName.CNN,
        model_preset="cifar10_3c3d",
        batch=128,
        quick_batch=32,
        input_shape=(3, 32, 32),
        likelihood=Likelihood.categorical,
        num_classes=10,
        data=DataKind.GENERATED,
    ),
    ProblemName.TOY: ProblemSpec(
        name=ProblemName.TOY,
        model_preset=None,
        batch=16,
        quick_batch=16,
        input_shape=(12,),
        likelihood=Likelihood.bernoulli,
        num_classes=None,
        data=DataKind.GENERATED,
    ),
}


@dataclass
class Problem:
    """A built problem: a fresh model each call of `new_model`, a pool of batches."""

    spec: ProblemSpec
    batch: int
    batches: list[tuple[Tensor, Tensor]]
    data_description: str
    model_source: str
    device: torch.device

    @property
    def likelihood(self) -> Likelihood:
        """The loss of the problem."""
        return self.spec.likelihood

    def new_model(self, *, seed: int = 0) -> nn.Module:
        """A freshly initialised model on the problem's device."""
        torch.manual_seed(seed)
        return build_problem_model(self.spec).to(self.device)

    def layers(self) -> list[LayerShape]:
        """Sizes of the preconditioned layers."""
        return layer_shapes(self.new_model(), self.batches[0][0])


def _sequential_ae(sizes: tuple[int, ...], *, code_index: int) -> nn.Sequential:
    """Logistic hidden units, linear code layer, logits out; flattens image inputs."""
    layers: list[nn.Module] = [nn.Flatten()]
    for index, (d_in, d_out) in enumerate(itertools.pairwise(sizes)):
        layers.append(nn.Linear(d_in, d_out))
        last = index == len(sizes) - 2
        if not last and index != code_index:
            layers.append(nn.Sigmoid())
    return nn.Sequential(*layers)


def inline_model(name: ProblemName) -> nn.Module:
    """The harness's own tiny autoencoder (problems without a conf/model preset)."""
    if name is not ProblemName.TOY:
        raise ValueError(f"inline_model: no inline model for {name.value}; it has a preset")
    return _sequential_ae(TOY_AE_SIZES, code_index=1)


@cache
def _model_cfg(preset: str) -> dict[str, Any] | None:
    """The conf/model preset's fields, or None when there is no such preset."""
    path = CONF_MODEL / f"{preset}.yaml"
    if not path.is_file():
        return None
    raw = yaml.safe_load(path.read_text()) or {}
    raw.pop("defaults", None)
    return dict(raw)


def build_problem_model(spec: ProblemSpec) -> nn.Module:
    """models.build_model of the problem's conf/model preset; the inline model for `toy`."""
    cfg = None if spec.model_preset is None else _model_cfg(spec.model_preset)
    if cfg is None:
        return inline_model(spec.name)
    return build_model(cfg)


def model_source(spec: ProblemSpec) -> str:
    """Where the model comes from, for the report."""
    if spec.model_preset is not None and _model_cfg(spec.model_preset) is not None:
        return f"models.build_model(conf/model/{spec.model_preset}.yaml)"
    return "bench.problems.inline_model"


def _generated(spec: ProblemSpec, count: int, *, seed: int) -> tuple[Tensor, Tensor | None]:
    gen = torch.Generator().manual_seed(seed)
    if spec.num_classes is None:
        return torch.rand((count, *spec.input_shape), generator=gen), None
    x = torch.randn((count, *spec.input_shape), generator=gen)
    return x, torch.randint(0, spec.num_classes, (count,), generator=gen)


def _mnist(count: int) -> tuple[Tensor, str] | None:
    try:
        bundle = load_dataset("mnist", DataConfig(), device=torch.device("cpu"), seed=0)
    except Exception as err:  # any failure: fall back to generated data, said in the report
        log.warning("bench: MNIST not loadable (%s); using generated data", err)
        return None
    x = bundle.train.x
    reps = -(-count // x.shape[0])
    return torch.cat([x] * reps)[:count], bundle.variant


def build_problem(name: ProblemName, *, batch: int, device: torch.device, seed: int = 0) -> Problem:
    """Build a problem with ``POOL_BATCHES`` batches of ``batch`` examples on ``device``."""
    spec = SPECS[name]
    if batch < 1:
        raise ValueError(f"batch: got {batch}; allowed: a positive integer")
    count = batch * POOL_BATCHES
    x: Tensor
    y: Tensor | None
    description = ""
    loaded = _mnist(count) if spec.data is DataKind.MNIST else None
    if loaded is not None:
        x, variant = loaded
        y = None
        description = f"{variant} (datasets.load_dataset('mnist'))"
    else:
        x, y = _generated(spec, count, seed=seed)
        shape = "×".join(str(s) for s in spec.input_shape)
        description = f"generated {shape} inputs" + ("" if y is None else ", random labels")
    x = x.to(device)
    y = None if y is None else y.to(device)
    batches = []
    for index in range(POOL_BATCHES):
        xb = x[index * batch : (index + 1) * batch]
        target = xb.reshape(batch, -1) if y is None else y[index * batch : (index + 1) * batch]
        batches.append((xb, target))
    return Problem(
        spec=spec,
        batch=batch,
        batches=batches,
        data_description=description,
        model_source=model_source(spec),
        device=device,
    )
