"""The one error type a user's mistake raises: it names the key, the value and the fix."""

from __future__ import annotations

from typing import Any


def _show(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


class ConfigError(ValueError):
    """A bad value in the user's config, reported on one line before any work starts.

    Args:
        key: the dotted config key, as the user would type it on the command line.
        value: the value it had.
        problem: what is wrong with it.
        fix: what to type instead.
    """

    def __init__(self, key: str, value: Any, problem: str, fix: str) -> None:
        self.key, self.value, self.problem, self.fix = key, value, problem, fix
        super().__init__(f"{key}={_show(value)}: {problem}; fix: {fix}")
