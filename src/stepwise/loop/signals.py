"""Stop signals: SIGTERM (a scheduler's or a user's stop) and SIGUSR2 (submitit's "time is nearly
up") end a job cleanly at any moment, with exit status 128 + the signal.

One handler per process, installed as the job starts. Until the training loop runs there is
nothing to save, so a signal raises `Stopped` at once, wherever the process is; the MLflow run,
if one is open, is closed as KILLED by whoever owns it. While a step is being taken, or the MLflow
run is being opened or closed, the signal is only recorded (`deferred()`): the loop finishes its
optimizer step, logs it, checkpoints, and stops with every rank at the same step.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator
from typing import Any

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR2)


class Stopped(BaseException):
    """A stop signal was honoured. A BaseException, like KeyboardInterrupt: it may be raised
    between any two bytecodes, and no library's `except Exception` may swallow it.

    Attributes:
        signum: the signal.
        checkpointed: the loop finished its step and saved a checkpoint before stopping (every
            rank at the same step); False when the signal came before training had started.
    """

    def __init__(self, signum: int, checkpointed: bool = False) -> None:
        super().__init__(f"stopped by signal {signum}")
        self.signum, self.checkpointed = signum, checkpointed

    def forward(self) -> None:
        """Once the run is closed: give the signal to the handler ours replaced, if any (e.g.
        submitit's SIGUSR2 handler, which requeues the job and exits)."""
        handler = STOP.previous.get(self.signum)
        if callable(handler):
            handler(self.signum, None)


def stop_in(err: BaseException) -> Stopped | None:
    """The Stopped that `err` is, or that caused it. A signal raised asynchronously can land in
    code that wraps whatever it raises: Python 3.11's class creation, for one, turns an exception
    in `__set_name__` (dataclasses, during an import) into a RuntimeError caused by it."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, Stopped):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


class StopSignals:
    """This process's stop signals: raised at once, or recorded inside `deferred()`."""

    def __init__(self) -> None:
        self.signum = 0  # the signal received (0: none)
        self.deferring = False
        self.previous: dict[int, Any] = {}  # the handlers ours replaced

    def install(self) -> None:
        """Handle SIGTERM and SIGUSR2 from now on in this process (idempotent)."""
        if self.previous:
            return
        for signum in STOP_SIGNALS:
            self.previous[signum] = signal.signal(signum, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        first, self.signum = not self.signum, signum
        # Only the first signal raises: a later one (SLURM's SIGTERM while submitit requeues a
        # job stopped by SIGUSR2, say) must not break the stop already under way, nor exit code.
        if first and not self.deferring:
            raise Stopped(signum)

    def start_job(self) -> None:
        """A job starts in this process: signals raise until the loop defers them."""
        self.deferring = False
        self.raise_pending()

    def end_job(self) -> None:
        """The job is over (however it ended): what is left of the process is only its exit."""
        self.deferring = True

    @contextlib.contextmanager
    def deferred(self) -> Iterator[None]:
        """Record signals instead of raising them until the block ends; `raise_pending()` then
        honours one that came meanwhile."""
        before, self.deferring = self.deferring, True
        try:
            yield
        finally:
            self.deferring = before

    def raise_pending(self) -> None:
        """Raise Stopped for a signal recorded while deferring (outside a deferred block)."""
        if self.signum and not self.deferring:
            raise Stopped(self.signum)


STOP = StopSignals()  # one per process: signal handlers are process-wide
