"""The preset files of conf/ (what ``group=option`` may name) and the ``--help`` listing."""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
GROUPS_RESOLVER = "preset_groups"


def group_options(group: str) -> list[str]:
    """Presets available in a config group folder."""
    folder = CONF_DIR / group
    return sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []


def preset_groups_help() -> str:
    """``group: option, ...`` lines for ``--help`` (the preset files; schemas are not choices)."""
    groups = sorted(p.name for p in CONF_DIR.iterdir() if p.is_dir() and group_options(p.name))
    return "\n".join(f"{group}: {', '.join(group_options(group))}" for group in groups)


def register_help_resolver() -> None:
    """``${preset_groups:}`` for the ``--help`` template in conf/config.yaml."""
    if not OmegaConf.has_resolver(GROUPS_RESOLVER):
        OmegaConf.register_new_resolver(GROUPS_RESOLVER, preset_groups_help)
