"""One run directory per job, and one job per run directory.

- Rank 0 resolves the run directory the user configured (`hydra.run.dir` on the command line or
  in a config file, `${now:...}` included) with its own Hydra; under torchrun or srun every other
  rank waits for it in a TCP store and runs its Hydra with exactly that directory. Each process
  evaluating `${now:...}` for itself would give one directory per rank.
- The process that owns the job holds an OS lock on `<run dir>/.stepwise.lock` for its lifetime
  (released by the kernel when it dies, even by SIGKILL): a second live job started on the same
  directory stops before any work, and the first is unharmed. A requeued or resumed job after a
  crash finds the lock free and proceeds.
"""

from __future__ import annotations

import fcntl
import os
import socket
import sys
import time
from collections.abc import Mapping, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from stepwise.contract.dist_env import DistEnv, detect
from stepwise.contract.errors import ConfigError

LOCK_FILE = ".stepwise.lock"
STORE_TIMEOUT = timedelta(seconds=300)  # how long ranks wait for rank 0 to name the directory
# How long rank 0, whose process hosts the store, waits at its end for ranks yet to read it.
READ_PATIENCE_S = 60.0
_held: dict[Path, int] = {}  # run directory -> file descriptor holding its lock
_store: dict[str, Any] = {}  # rank 0 of a launched job: the store to publish the directory in


def lock(run_dir: Path) -> None:
    """Hold `run_dir`'s lock for this process's lifetime; ConfigError if a live job holds it."""
    run_dir = Path(run_dir).resolve()
    if run_dir in _held:
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(run_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise ConfigError("hydra.run.dir", str(run_dir), f"a live job ({holder}) is training in "
                          "this run directory", "wait for it to end (or stop it), or choose "
                          "another hydra.run.dir") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
    _held[run_dir] = fd


def release(run_dir: Path) -> None:
    """Give the lock back before the process ends (in-process jobs: tests, sweeps)."""
    fd = _held.pop(Path(run_dir).resolve(), None)
    if fd is not None:
        os.close(fd)  # closing the descriptor releases the flock


# -- one directory for every rank of a launched job ----------------------------------------------
def _store_key(env: Mapping[str, str]) -> str:
    return f"stepwise/run_dir/{env.get('TORCHELASTIC_RESTART_COUNT', '0')}"


def _connect(dist: DistEnv, env: Mapping[str, str]):
    """The job's TCP store. torchrun's agent hosts one; otherwise (srun) rank 0 hosts it on the
    rendezvous port, multi-tenant, so that `init_process_group` later reuses the same server."""
    from torch.distributed import TCPStore

    if env.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        return TCPStore(dist.master_addr, dist.master_port, is_master=False,
                        timeout=STORE_TIMEOUT)
    return TCPStore(dist.master_addr, dist.master_port, is_master=dist.rank == 0,
                    wait_for_workers=False, multi_tenant=True, timeout=STORE_TIMEOUT)


def rank_overrides(argv: Sequence[str], env: Mapping[str, str]) -> list[str]:
    """Hydra overrides that make this rank of a launched job use rank 0's run directory.

    Rank 0 gets none (its Hydra resolves the directory; `RunDirCallback` publishes it). Another
    rank waits for the directory and gets `hydra.run.dir=<it>` and no `.hydra/` copy of its own.
    Exits 2 (rank 0 says why) if rank 0 stopped before naming one.
    """
    dist = detect(env)
    if not dist.launched or "-m" in argv or "--multirun" in argv:
        return []
    store = _connect(dist, env)
    if dist.rank == 0:
        hosted = env.get("TORCHELASTIC_USE_AGENT_STORE") != "True"  # else torchrun's agent's
        _store.update(store=store, key=_store_key(env), readers=dist.world_size - 1 if hosted else 0)
        return []
    run_dir = store.get(_store_key(env)).decode()
    store.add(_store_key(env) + "/read", 1)  # once all have read, rank 0 (the store) may end
    if not run_dir:
        sys.exit(2)  # rank 0 stopped before training and has said why
    return [f"hydra.run.dir={run_dir}", "hydra.output_subdir=null"]


def publish(run_dir: str) -> None:
    """Rank 0: tell the other ranks the run directory ("": there will be none)."""
    store = _store.pop("store", None)
    if store is not None:
        key = _store.pop("key")
        store.set(key, run_dir)
        _store.update(published=store, read_key=f"{key}/read")  # alive for init_process_group


def publish_none() -> None:
    """Rank 0 leaves without having named a directory: the other ranks stop too."""
    if "store" in _store:
        publish("")


def wait_for_readers(patience_s: float = READ_PATIENCE_S) -> None:
    """Rank 0, whose process hosts the store (srun): before it ends, and the store with it, wait
    until every other rank has read the directory, or `patience_s` has passed. A rank slower to
    start than rank 0 is to refuse the job would otherwise wait STORE_TIMEOUT for a store that is
    gone (seen under load: an srun of a refused job hung for 5 minutes)."""
    store, readers = _store.get("published"), _store.get("readers", 0)
    if store is None or not readers:
        return
    deadline = time.monotonic() + patience_s
    while store.add(_store["read_key"], 0) < readers and time.monotonic() < deadline:
        time.sleep(0.05)


class RunDirCallback(Callback):
    """Hydra callback: before Hydra writes anything into the run directory, the owning process
    takes its lock, and rank 0 of a launched job tells the other ranks which directory it is."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        from hydra.core.hydra_config import HydraConfig

        HydraConfig.instance().set_config(config)  # for ${hydra:...} in the directory's name
        run_dir = Path(OmegaConf.select(config, "hydra.run.dir")).resolve()
        self._claim(run_dir)
        publish(str(run_dir))

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        if self._multirun(config):  # each job of a sweep has a directory of its own
            self._claim(Path(config.hydra.runtime.output_dir))

    def on_job_end(self, config: DictConfig, **kwargs: Any) -> None:
        if self._multirun(config):  # the next job of an in-process sweep needs no old lock
            release(Path(config.hydra.runtime.output_dir))

    @staticmethod
    def _multirun(config: DictConfig) -> bool:
        return config.hydra.mode is not None and config.hydra.mode.name == "MULTIRUN"

    @staticmethod
    def _claim(run_dir: Path) -> None:
        if detect(os.environ).rank != 0:
            return
        try:
            lock(run_dir)
        except ConfigError as err:
            print(f"error: {err}", file=sys.stderr)
            publish_none()
            sys.exit(2)
