"""StopSignals: the first stop signal raises (outside the loop), later ones only record, and
nothing raises once the job is over (a scheduler's SIGTERM during a requeue's exit)."""

from __future__ import annotations

import os
import signal

import pytest

from stepwise.loop.signals import STOP_SIGNALS, Stopped, StopSignals, stop_in


@pytest.fixture
def stops():
    saved = {signum: signal.getsignal(signum) for signum in STOP_SIGNALS}
    yield StopSignals()
    for signum, handler in saved.items():
        signal.signal(signum, handler)


def test_the_first_signal_raises_and_a_second_only_records(stops):
    stops.install()
    with pytest.raises(Stopped) as stopped:
        os.kill(os.getpid(), signal.SIGUSR2)
    assert stopped.value.signum == signal.SIGUSR2 and not stopped.value.checkpointed
    os.kill(os.getpid(), signal.SIGTERM)  # while the stop is under way: recorded, not raised
    assert stops.signum == signal.SIGTERM


def test_deferred_signals_are_recorded_and_raised_when_asked(stops):
    stops.install()
    with stops.deferred():
        os.kill(os.getpid(), signal.SIGTERM)
    assert stops.signum == signal.SIGTERM
    with pytest.raises(Stopped):
        stops.raise_pending()


def test_nothing_raises_once_the_job_is_over(stops):
    stops.install()
    stops.start_job()
    stops.end_job()
    os.kill(os.getpid(), signal.SIGTERM)
    assert stops.signum == signal.SIGTERM


def test_a_stop_wrapped_by_the_code_it_landed_in_is_still_a_stop():
    """What CI met: SIGTERM arrived while an import created a dataclass, and class creation
    wrapped the exception raised in `__set_name__` (Python 3.11: a RuntimeError caused by it)."""

    class Descriptor:
        def __set_name__(self, owner, name):
            raise Stopped(signal.SIGTERM)

    with pytest.raises(BaseException) as caught:
        type("Model", (), {"field": Descriptor()})
    stop = stop_in(caught.value)
    assert stop is not None and stop.signum == signal.SIGTERM
    assert stop_in(RuntimeError("a real failure")) is None
