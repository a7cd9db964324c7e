"""Starting DDP and FSDP ranks: spawn them through torch's elastic launcher (what torchrun uses)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any

from torch.distributed.elastic.multiprocessing import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, record

from stepwise.contract.errors import RanksFailed, UserCodeFailed
from stepwise.loop.signals import STOP, STOP_SIGNALS, Stopped, stop_in
from stepwise.run.job import Job

log = logging.getLogger(__name__)

LOG_FORMAT = "[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"


def spawn(job: Job, tracker, log_file: str | None) -> dict[str, float]:
    """Run `job.world.nproc` DDP (or FSDP) workers on this node; return rank 0's final metrics.

    The elastic launcher watches the workers: when one fails, it stops the others and raises
    ChildFailedError with the failing rank's traceback (as torchrun would print it), or, when the
    user's data raised on some rank, that rank's UserCodeFailed (the launcher may have seen
    another rank first: one whose collective failed as the failing rank left).
    """
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    config = _launch_config(job.world.nproc, job.config.parallel.timeout_s)
    log.info("spawning %d %s workers (world_size=%d)", job.world.nproc, job.world.mode.upper(),
             job.world.size)
    run_id = getattr(tracker, "run_id", None)
    uri = getattr(tracker, "tracking_uri", None)
    # The launcher replaces the handlers of the signals it forwards, and does not put them back.
    handlers = {signum: signal.getsignal(signum) for signum in (*STOP_SIGNALS, signal.SIGINT)}
    if "signals_to_handle" not in _supported(LaunchConfig, signals_to_handle=None):  # torch < 2.10
        signal.signal(signal.SIGUSR2, _raise_signal_exception)  # what >= 2.10 does for SIGUSR2
    reports = Path(tempfile.mkdtemp(prefix="stepwise-failed-"))
    torch_log = logging.getLogger("torch.distributed.elastic.multiprocessing.api")
    torch_log.addFilter(_not_the_failure)
    try:
        results = elastic_launch(config, _worker)(job, run_id, uri, log_file, str(reports))
    except ChildFailedError as err:
        if (failed := _user_code_failed(reports)) is not None:
            raise failed from None
        codes = {failure.exitcode for failure in err.failures.values()}
        # 128 + signal: a rank honoured a stop signal; -signal: it was still starting up
        stopped = {code: s for s in STOP_SIGNALS for code in (128 + s, -s)}
        if set(codes) <= set(stopped):
            raise Stopped(stopped[min(codes, key=abs)],
                          checkpointed=all(code > 0 for code in codes)) from None
        raise RanksFailed(err.format_msg()) from None
    except SignalException as err:
        raise Stopped(int(err.sigval)) from None
    finally:
        torch_log.removeFilter(_not_the_failure)
        shutil.rmtree(reports, ignore_errors=True)
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
    steps = [int(results[rank]["global_step"]) for rank in sorted(results)]
    log.info("global_step on each rank: %s (plan: %d)", steps, job.plan.total_optimizer_steps)
    return results[0]


def _launch_config(nproc: int, timeout: int):
    """Torch's elastic launcher on this node: `nproc` spawned workers, no restarts."""
    from torch.distributed.launcher.api import LaunchConfig

    return LaunchConfig(
        min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=uuid.uuid4().hex,
        rdzv_backend="c10d", rdzv_endpoint="127.0.0.1:0", rdzv_configs={"timeout": timeout},
        max_restarts=0, monitor_interval=0.1, start_method="spawn",
        # SIGTERM/SIGUSR2 reach the workers, which finish their step and checkpoint meanwhile.
        **_supported(LaunchConfig, shutdown_timeout=timeout,  # torch >= 2.12
                     signals_to_handle="SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR2"),  # torch >= 2.10
    )


def spawn_ranks(nproc: int, timeout: int, entrypoint, *args) -> dict[int, Any]:
    """Run `entrypoint(*args)` (a module-level function, decorated with `record`) in `nproc`
    spawned workers on this node; {rank: what it returned}. A failed worker is RanksFailed,
    with its traceback. For work with no checkpoint to stop at (`stepwise eval`): a stop signal
    ends the workers at once."""
    from torch.distributed.launcher.api import elastic_launch

    handlers = {signum: signal.getsignal(signum) for signum in (*STOP_SIGNALS, signal.SIGINT)}
    torch_log = logging.getLogger("torch.distributed.elastic.multiprocessing.api")
    torch_log.addFilter(_not_the_failure)
    try:
        return elastic_launch(_launch_config(nproc, timeout), entrypoint)(*args)
    except ChildFailedError as err:
        raise RanksFailed(err.format_msg()) from None
    except SignalException as err:
        raise Stopped(int(err.sigval)) from None
    finally:
        torch_log.removeFilter(_not_the_failure)
        for signum, handler in handlers.items():
            signal.signal(signum, handler)


def start_worker(world, device: str, log_file: str | None = None):
    """What a spawned worker does first: die with its launcher, log as its rank does, take its
    share of the CPU cores; its world, joined from the launcher's environment."""
    from stepwise.contract.dist_env import detect

    _die_with_parent()
    world = world.joined(detect(os.environ))
    _configure_logging(world.rank, log_file)
    _share_cpu_threads(world.nproc, device)
    return world


def _not_the_failure(record: logging.LogRecord) -> bool:
    """The launcher logs a failed worker's traceback, which stepwise reports itself: once."""
    return not str(record.msg).startswith("failed (exitcode")


def _report(err: UserCodeFailed, reports: str, rank: int) -> None:
    """What a rank whose data raised tells the launching process (which prints it once)."""
    path = Path(reports) / f"rank-{rank}.json"
    path.with_suffix(".tmp").write_text(json.dumps({"line": str(err), "details": err.details}))
    path.with_suffix(".tmp").replace(path)


def _release(err: BaseException | None) -> None:
    """Let go of the frames of the error's traceback: the data loader iterator they hold then
    stops its worker processes (at exit they would be killed, leaking their semaphores)."""
    import gc
    import traceback

    while err is not None:
        traceback.clear_frames(err.__traceback__)
        err = err.__cause__ or err.__context__
    gc.collect()


def _user_code_failed(reports: Path) -> UserCodeFailed | None:
    """The ranks' reports of their data raising, as one error (None: no rank's data raised)."""
    found = sorted(reports.glob("rank-*.json"), key=lambda path: int(path.stem.split("-")[1]))
    if not found:
        return None
    told = [json.loads(path.read_text()) for path in found]
    return UserCodeFailed("\nerror: ".join(report["line"] for report in told),
                          "".join(report["details"] for report in told))


def _raise_signal_exception(signum: int, frame) -> None:
    """The elastic launcher's own handler: it stops the workers with this signal and re-raises."""
    raise SignalException(f"Process {os.getpid()} got signal: {signum}",
                          sigval=signal.Signals(signum))


def _supported(cls, **options):
    """The options that this torch's `cls` (a dataclass) knows."""
    import dataclasses

    fields = {field.name for field in dataclasses.fields(cls)}
    return {key: value for key, value in options.items() if key in fields}


@record
def _worker(job: Job, run_id: str | None, tracking_uri: str | None,
            log_file: str | None, reports: str) -> dict[str, float]:
    """One spawned rank: join the group, train, and log into the parent's MLflow run (rank 0)."""
    from stepwise.parallel.replica import start_replica, stop_replica
    from stepwise.run.fit import train
    from stepwise.run.resume import resume_state
    from stepwise.tracking.outbox import UNSENT_DIR
    from stepwise.tracking.tracker import MlflowTracker, NullTracker

    STOP.install()
    world = start_worker(job.world, job.config.trainer.device, log_file)
    try:
        replica = start_replica(world, job.config.parallel, job.config.trainer.device)
    except BaseException as err:
        if (stop := stop_in(err)) is None:
            raise
        os._exit(128 + stop.signum)  # stopped while joining the group: nothing to leave
    try:
        tracker = NullTracker()
        if replica.is_main and run_id is not None:
            tracker = MlflowTracker(tracking_uri, job.config.logger.experiment_name, run_id=run_id,
                                    spool_dir=job.run_dir / UNSENT_DIR,
                                    flush_timeout_s=job.config.logger.flush_timeout_s)
        try:
            result = train(job, replica, tracker, resume_state(job))
        finally:
            tracker.close()  # what it logged is sent (or spooled) before this process ends
    except BaseException as err:
        # What is left is this process's exit: the launcher's SIGTERM, which comes when another
        # rank failed first, must not add a traceback of its own (an atexit callback's, say).
        STOP.end_job()
        stop = stop_in(err)
        # After a checkpoint every rank is at the same step and they leave the group together;
        # otherwise each rank is somewhere else: leave without a collective.
        stop_replica(replica, failed=stop is None or not stop.checkpointed)
        if isinstance(err, UserCodeFailed):
            _report(err, reports, world.rank)  # the launching process prints it, once
            _release(err)
        elif stop is None:
            raise
        # Leave now: a returning elastic worker would wait for its launcher to collect the
        # result, while the launcher, shutting down, waits for it to exit (and the data loader's
        # processes, alive in the error's frames, would be killed at exit with a traceback).
        logging.shutdown()
        os._exit(128 + stop.signum if stop is not None else 1)
    stop_replica(replica)
    return result


def _share_cpu_threads(nproc: int, device: str) -> None:
    """Ranks on the CPU share this node's cores: each takes its share of intra-op threads (as
    torchrun does by setting OMP_NUM_THREADS=1), instead of every rank using all of them. With 2
    ranks on 2 cores, oversubscribed threads made tinytext_lm's DDP steps about 4x slower."""
    import torch

    if "OMP_NUM_THREADS" in os.environ or (device != "cpu" and torch.cuda.is_available()):
        return
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    torch.set_num_threads(max(1, (cores or 1) // nproc))
    log.info("%d CPU cores for %d DDP ranks: %d intra-op threads per rank", cores, nproc,
             torch.get_num_threads())


def _die_with_parent() -> None:
    """A worker whose launching process is killed (even with SIGKILL) gets SIGKILL too, on Linux:
    no orphan keeps training, or writing checkpoints, behind a dead job."""
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)


def _configure_logging(rank: int, log_file: str | None) -> None:
    """Spawned processes start without Hydra's logging: rank 0 logs to the console and the job
    log, other ranks only warnings."""
    root = logging.getLogger()
    root.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stdout)]
    if rank == 0 and log_file:
        handlers.append(logging.FileHandler(log_file))
    for handler in handlers:
        handler.setFormatter(logging.Formatter(LOG_FORMAT))
        root.addHandler(handler)
