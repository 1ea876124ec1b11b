"""Per-family optimizer settings of an experiment preset (``optimizer_settings`` in the config).

A preset that sweeps several optimizers (``optimizer: sgd,adam,kfac,kfac2``) often needs settings
that differ per optimizer: a source's SGD runs Nesterov momentum, its K-FAC another damping mode.
An experiment's ``optimizer:`` block is merged into whichever optimizer is chosen, so it can only
hold keys every swept schema has. ``optimizer_settings`` maps an optimizer *family* (the schema
``name``: sgd, adam, kfac, kfac2) to the settings merged over the chosen preset of that family::

    optimizer_settings:
      sgd: {lr: 1.2755e-4, nesterov: true}
      kfac: &kfac {damping_mode: factored_unit, fixed_pi: 0.0012755}
      kfac2: *kfac

Precedence (lowest first): the optimizer preset, the experiment's ``optimizer:`` block, these
settings, then the command line (``optimizer.lr=...``, a tuning trial's grid point). The node is
emptied once applied: the recorded ``optimizer`` block holds the values the run used.
"""

from __future__ import annotations

from collections.abc import Sequence

from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from core.errors import ConfigError
from optimizers.registry import FAMILIES

NODE = "optimizer_settings"


def _command_line_keys(overrides: Sequence[str]) -> set[str]:
    """Optimizer settings set on the command line (``optimizer.lr=0.1``, ``+optimizer.x=...``)."""
    keys = set()
    for override in overrides:
        key = override.split("=", 1)[0].lstrip("+~")
        if key.startswith("optimizer.") and "=" in override:
            keys.add(key.removeprefix("optimizer.").split(".", 1)[0])
    return keys


def apply_optimizer_settings(cfg: DictConfig, overrides: Sequence[str] = ()) -> DictConfig:
    """Merge ``cfg.optimizer_settings[<family>]`` into ``cfg.optimizer`` (in place; returned).

    Settings named in ``overrides`` (the job's command line) keep their command-line value.
    Raises ConfigError for an unknown family or a setting the family's schema does not have.
    """
    per_family = cfg.get(NODE)
    if not per_family:
        return cfg
    unknown = sorted(set(per_family) - set(FAMILIES))
    if unknown:
        raise ConfigError(
            f"{NODE}.{unknown[0]}", f"not an optimizer family; allowed: {', '.join(FAMILIES)}"
        )
    family = str(cfg.optimizer.name)
    settings = per_family.get(family)
    if settings:
        keep = _command_line_keys(overrides)
        given = OmegaConf.to_container(settings)
        if not isinstance(given, dict):
            raise ConfigError(f"{NODE}.{family}", "must be a mapping of settings to values")
        chosen = {str(k): v for k, v in given.items() if str(k) not in keep}
        for key in chosen:
            if key not in cfg.optimizer:
                raise ConfigError(
                    f"{NODE}.{family}.{key}",
                    f"not a {family} setting; allowed: {', '.join(map(str, cfg.optimizer))}",
                )
        try:
            cfg.optimizer = OmegaConf.merge(cfg.optimizer, chosen)
        except OmegaConfBaseException as err:
            first = str(err).splitlines()[0]
            raise ConfigError(f"{NODE}.{family}", first) from None
    with open_dict(cfg):
        cfg[NODE] = {}
    return cfg
