"""Model builders: ``build_model(cfg)`` turns a model preset into an ``nn.Module``."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from torch import nn

from core.errors import ConfigError
from models.autoencoder import DeepAutoencoder
from models.cnn import cifar10_3c3d, fmnist_2c2d, resnet18, simple_cnn
from models.config import (
    SCHEMAS,
    AutoencoderConfig,
    CNNArch,
    CNNConfig,
    DeepLinearConfig,
    DeepLinearInit,
    ModelConfig,
    Task,
)
from models.deep_linear import DeepLinearNet

__all__ = ["SCHEMAS", "as_model_config", "build_model", "count_parameters"]

CNN_BUILDERS: dict[CNNArch, Callable[..., nn.Module]] = {
    CNNArch.simple_cnn: simple_cnn,
    CNNArch.fmnist_2c2d: fmnist_2c2d,
    CNNArch.cifar10_3c3d: cifar10_3c3d,
    CNNArch.resnet18: resnet18,
}
# A schemaless config is recognised by the field only its schema has.
MARKER_FIELDS: dict[str, type[ModelConfig]] = {
    "layers": AutoencoderConfig,
    "depth": DeepLinearConfig,
    "arch": CNNConfig,
}


def as_model_config(cfg: ModelConfig | DictConfig | Mapping[str, Any]) -> ModelConfig:
    """A typed model config from a dataclass, a composed Hydra node or a plain mapping."""
    if isinstance(cfg, ModelConfig):
        return cfg
    schema: type[ModelConfig] | None = None
    if isinstance(cfg, DictConfig):
        node_type = OmegaConf.get_type(cfg)
        if isinstance(node_type, type) and issubclass(node_type, ModelConfig):
            schema = node_type
    if schema is None:
        keys = set(cfg.keys())
        matches = [s for key, s in MARKER_FIELDS.items() if key in keys]
        if len(matches) != 1:
            raise ConfigError(
                "model",
                "cannot tell the architecture; allowed: a preset with exactly one of "
                "layers (autoencoder), depth (deep linear), arch (CNN)",
            )
        schema = matches[0]
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), cfg)
        obj = OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or "?"
        first = str(err).splitlines()[0]
        raise ConfigError(f"model.{key}", first) from None
    assert isinstance(obj, ModelConfig)
    return obj


def _require(setting: str, ok: bool, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"model.{setting}", f"got {value!r}; allowed: {allowed}")


def _build_autoencoder(cfg: AutoencoderConfig) -> nn.Module:
    layers = list(cfg.layers)
    _require(
        "layers",
        len(layers) >= 3 and all(w >= 1 for w in layers) and layers[0] == layers[-1],
        layers,
        "at least 3 positive widths from input to output, first == last",
    )
    _require("task", cfg.task is Task.autoencoder, cfg.task, "autoencoder for this schema")
    _require("sparse_connections", cfg.sparse_connections >= 1, cfg.sparse_connections, ">= 1")
    return DeepAutoencoder(
        layers,
        activation=cfg.activation,
        init=cfg.init,
        sparse_connections=cfg.sparse_connections,
    )


def _build_deep_linear(cfg: DeepLinearConfig) -> nn.Module:
    for setting in ("width", "input_dim", "output_dim"):
        value = getattr(cfg, setting)
        _require(setting, value >= 1, value, "an integer >= 1")
    _require("depth", cfg.depth >= 0, cfg.depth, "an integer >= 0")
    _require("task", cfg.task is Task.classification, cfg.task, "classification for this schema")
    return DeepLinearNet(
        depth=cfg.depth,
        width=cfg.width,
        input_dim=cfg.input_dim,
        output_dim=cfg.output_dim,
        batchnorm=cfg.batchnorm,
        output_bias=cfg.output_bias,
        init=DeepLinearInit(getattr(cfg.init, "value", cfg.init)),
    )


def _build_cnn(cfg: CNNConfig) -> nn.Module:
    _require("in_channels", cfg.in_channels >= 1, cfg.in_channels, "an integer >= 1")
    _require("num_classes", cfg.num_classes >= 2, cfg.num_classes, "an integer >= 2")
    _require("task", cfg.task is Task.classification, cfg.task, "classification for this schema")
    try:
        return CNN_BUILDERS[cfg.arch](
            in_channels=cfg.in_channels, num_classes=cfg.num_classes, image_size=cfg.image_size
        )
    except RuntimeError:
        raise ConfigError(
            "model.image_size", f"got {cfg.image_size}; too small for {cfg.arch.value}"
        ) from None


def build_model(cfg: ModelConfig | DictConfig | Mapping[str, Any]) -> nn.Module:
    """The network a model preset describes (autoencoder, deep linear network or CNN)."""
    config = as_model_config(cfg)
    if isinstance(config, AutoencoderConfig):
        return _build_autoencoder(config)
    if isinstance(config, DeepLinearConfig):
        return _build_deep_linear(config)
    if isinstance(config, CNNConfig):
        return _build_cnn(config)
    names = ", ".join(s.__name__ for s in SCHEMAS.values())
    raise ConfigError("model", f"unsupported schema {type(config).__name__}; allowed: {names}")


def count_parameters(model: nn.Module, *, trainable_only: bool = True) -> int:
    """Number of parameters (only those with requires_grad by default)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
