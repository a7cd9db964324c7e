"""The errors that end a run, each with its exit status: a user's mistake (ConfigError, 2), a run
that did not do what it planned (PlanMismatch, NonFiniteLoss, RanksFailed, UserCodeFailed: 1). A
stop signal is `stepwise.loop.signals.Stopped` (128 + the signal)."""

from __future__ import annotations

import traceback
from typing import Any


def _show(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def one_line(key: str, value: Any, problem: str, fix: str) -> str:
    """`key=value: problem; fix: fix`, the one line of a ConfigError and of a warning."""
    return f"{key}={_show(value)}: {problem}; fix: {fix}"


class ConfigError(ValueError):
    """A bad value in the user's config, reported on one line before any work starts.

    Args:
        key: the dotted config key, as the user would type it on the command line.
        value: the value it had.
        problem: what is wrong with it.
        fix: what to type instead.
    """

    exit_code = 2

    def __init__(self, key: str, value: Any, problem: str, fix: str) -> None:
        self.key, self.value, self.problem, self.fix = key, value, problem, fix
        super().__init__(one_line(key, value, problem, fix))


class RunFailed(RuntimeError):
    """The run started and could not end as planned: it is marked FAILED, never reported fine."""

    exit_code = 1


class PlanMismatch(RunFailed):
    """What was executed differs from the plan."""


class NonFiniteLoss(RunFailed):
    """`trainer.on_nonfinite=stop` and a window's loss was NaN or infinite."""


class EmptyWindow(RunFailed):
    """An optimizer-step window whose samples hold no loss item (every target is padding)."""


class RanksFailed(RunFailed):
    """A DDP worker failed; the message holds its error."""


class UserCodeFailed(RunFailed):
    """The user's own code (a dataset, a collate function) raised while the run was training.

    The message is one line naming the config key, the sample, the step and the rank;
    `details` is the user's traceback, shown once above it.
    """

    def __init__(self, message: str, details: str | None = None) -> None:
        super().__init__(message)
        self._details = details

    @property
    def details(self) -> str:
        """The traceback of the user's error: as given (by a DDP worker), else of the cause."""
        text, cause = self._details, self.__cause__
        if text is None and cause is not None:
            text = "".join(traceback.format_exception(type(cause), cause, cause.__traceback__))
        return text.rstrip("\n") + "\n" if text else ""
