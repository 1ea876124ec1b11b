"""The one-line error raised when a dataset cannot be found in any allowed source."""

from __future__ import annotations

from core.errors import ConfigError


class DataNotFoundError(ConfigError):
    """A dataset missing from every source tried; the message names where to look and get it."""

    def __init__(self, problem: str, *, setting: str = "data.root") -> None:
        super().__init__(setting, problem)
