"""User-facing errors: one line naming the setting and what is allowed."""

from __future__ import annotations


class ConfigError(ValueError):
    """An invalid setting; its message is a single line shown to the user as is."""

    def __init__(self, setting: str, problem: str) -> None:
        self.setting = setting
        self.problem = problem
        super().__init__(f"{setting}: {problem}")
