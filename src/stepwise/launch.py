"""Starting DDP ranks: spawn them through torch's elastic launcher (what torchrun uses), and agree
on one Hydra run directory when torchrun started every rank with its own Hydra.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path

from torch.distributed.elastic.multiprocessing import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, record

from stepwise.job import Job
from stepwise.trainer import Stopped

log = logging.getLogger(__name__)

LOG_FORMAT = "[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"


class RanksFailed(RuntimeError):
    """A spawned rank raised; the message names the rank and carries its traceback."""


def spawn(job: Job, tracker, log_file: str | None) -> dict[str, float]:
    """Run `job.nproc` DDP workers on this node; return rank 0's final metrics.

    The elastic launcher watches the workers: when one fails, it stops the others and raises
    ChildFailedError with the failing rank's traceback (as torchrun would print it).
    """
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    timeout = job.config.parallel.timeout_s
    config = LaunchConfig(
        min_nodes=1, max_nodes=1, nproc_per_node=job.nproc, run_id=uuid.uuid4().hex,
        rdzv_backend="c10d", rdzv_endpoint="127.0.0.1:0", rdzv_configs={"timeout": timeout},
        max_restarts=0, monitor_interval=0.1, start_method="spawn",
        # SIGTERM/SIGUSR2 reach the workers, which finish their step and checkpoint meanwhile.
        signals_to_handle="SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR2",
        **_supported(LaunchConfig, shutdown_timeout=timeout),  # torch >= 2.12
    )
    log.info("spawning %d DDP workers (world_size=%d)", job.nproc, job.plan.world_size)
    run_id = getattr(tracker, "run_id", None)
    uri = getattr(tracker, "tracking_uri", None)
    try:
        results = elastic_launch(config, _worker)(job, run_id, uri, log_file)
    except ChildFailedError as err:
        codes = {failure.exitcode for failure in err.failures.values()}
        stopped = {128 + s for s in (signal.SIGTERM, signal.SIGUSR2)}
        if codes <= stopped:  # the ranks got a stop signal directly, checkpointed and left
            raise Stopped(min(codes) - 128) from None
        raise RanksFailed(err.format_msg()) from None
    except SignalException as err:
        raise Stopped(int(err.sigval)) from None
    steps = [int(results[rank]["global_step"]) for rank in sorted(results)]
    log.info("global_step on each rank: %s (plan: %d)", steps, job.plan.total_optimizer_steps)
    return results[0]


def _supported(cls, **options):
    """The options that this torch's `cls` (a dataclass) knows."""
    import dataclasses

    fields = {field.name for field in dataclasses.fields(cls)}
    return {key: value for key, value in options.items() if key in fields}


@record
def _worker(job: Job, run_id: str | None, tracking_uri: str | None,
            log_file: str | None) -> dict[str, float]:
    """One spawned rank: join the group, train, and log into the parent's MLflow run (rank 0)."""
    from stepwise.dist_env import detect
    from stepwise.distributed import start_replica, stop_replica
    from stepwise.runner import resume_state, train
    from stepwise.tracking import MlflowTracker, NullTracker

    _die_with_parent()
    env = detect(os.environ)
    _configure_logging(env.rank, log_file)
    replica = start_replica(job.config.parallel, job.config.trainer.device, env)
    try:
        tracker = NullTracker()
        if replica.is_main and run_id is not None:
            tracker = MlflowTracker(tracking_uri, job.config.logger.experiment_name, run_id=run_id)
        result = train(job, replica, tracker, resume_state(job))
    except Stopped as stop:
        # The checkpoint is saved. Leave now: a returning elastic worker would wait for its
        # launcher to collect the result, while the launcher, shutting down, waits for it to exit.
        stop_replica(replica)
        logging.shutdown()
        os._exit(128 + stop.signum)
    except BaseException:
        stop_replica(replica, failed=True)
        raise
    stop_replica(replica)
    return result


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


# -- one run directory for all ranks under torchrun ------------------------------------------------
def _user_sets_run_dir(argv: Sequence[str]) -> bool:
    return any(arg.lstrip("+").startswith("hydra.run.dir=") for arg in argv)


def shared_run_dir_overrides(argv: Sequence[str], env: Mapping[str, str]) -> list[str]:
    """Extra Hydra overrides so that every rank of a launched job uses one run directory.

    Hydra evaluates `${now:...}` in each process, so torchrun or srun ranks would each make their
    own timestamped directory. Under torchrun, rank 0 picks the directory and publishes it in the
    store that torchrun's agent already hosts for its workers; the other ranks read it there. In a
    SLURM step the directory is named after the job and step ids. Ranks other than 0 write no
    `.hydra/` copy.
    """
    from stepwise.dist_env import detect

    dist = detect(env)
    if not dist.launched or "-m" in argv or "--multirun" in argv:
        return []
    extra = [] if dist.rank == 0 else ["hydra.output_subdir=null"]
    if _user_sets_run_dir(argv):
        return extra
    if dist.source == "slurm":  # every task of the step knows the job and step ids
        step = f"{env.get('SLURM_JOB_ID', '0')}_{env.get('SLURM_STEP_ID', '0')}"
        return [f"hydra.run.dir=outputs/slurm/{step}", *extra]
    if env.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        # No shared store to talk through: name the directory after the rendezvous run id.
        run_id = env.get("TORCHELASTIC_RUN_ID", "none")
        return [f"hydra.run.dir=outputs/torchrun/{run_id}-{dist.master_port}", *extra]
    from datetime import timedelta

    from torch.distributed import TCPStore

    store = TCPStore(dist.master_addr, dist.master_port, is_master=False,
                     timeout=timedelta(seconds=120))
    key = f"stepwise/run_dir/{env.get('TORCHELASTIC_RESTART_COUNT', '0')}"
    if dist.rank == 0:
        run_dir = str(Path("outputs") / time.strftime("%Y-%m-%d") / time.strftime("%H-%M-%S"))
        store.set(key, run_dir)
    else:
        run_dir = store.get(key).decode()
    return [f"hydra.run.dir={run_dir}", *extra]
