"""Shared helpers: compose the real config, train in-process, and run the real CLI."""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from stepwise.config.schemas import give_user_groups_schemas
from stepwise.loop import cpu_isa
from stepwise.main import CONF_DIR
from stepwise.run.job import Job, prepare

# Tests autocast to bfloat16 and float16 on the CPU in this process: on a CPU that advertises AMX
# but traps it, oneDNN must be capped before the first torch operation, as `python train.py` does.
for _dtype in ("bfloat16", "float16"):
    cpu_isa.guard(_dtype, warn=False)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _mlflow_global_store_put_back():
    """`mlflow.set_tracking_uri` also sets $MLFLOW_TRACKING_URI, which stepwise reads when
    `logger.tracking_uri` is null: a test that loads a model through MLflow's global store
    would send every later test of its worker process to that store."""
    before = os.environ.get("MLFLOW_TRACKING_URI")
    yield
    if "mlflow" in sys.modules:
        sys.modules["mlflow"].set_tracking_uri(before)
    if before is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = before


def compose_config(*overrides: str):
    """The typed Config that `python train.py <overrides>` would get."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=list(overrides))
    give_user_groups_schemas(cfg)
    return OmegaConf.to_object(cfg)


def prepare_job(tmp_path: Path, *overrides: str) -> Job:
    run_dir = tmp_path / "run"
    run_dir.mkdir(parents=True, exist_ok=True)
    return prepare(compose_config(*overrides), run_dir=run_dir, start_dir=tmp_path)


def run_two_ranks(target, *args, timeout: float = 240) -> list:
    """Run `target(rank, *args, queue)` in 2 spawned processes; their results, sorted (each
    process puts one on the queue). Waits for the results themselves, not for a duration."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=target, args=(rank, *args, queue)) for rank in range(2)]
    for p in procs:
        p.start()
    results = sorted(queue.get(timeout=timeout) for _ in procs)
    for p in procs:
        p.join(timeout=30)
    return results


def by_hand_on_test_split(job: Job, state: dict, shards: int = 1) -> dict[str, float]:
    """`test/loss` (the mean cross-entropy over the whole test split) and `test/accuracy` of the
    job's built-in model with `state`'s weights, in one batch; with `shards`, also
    `mean_of_shard_means`: the average of the per-rank means a naive reduction would log."""
    import numpy as np
    import torch
    from torch.nn import functional as F

    from stepwise.run.build import build_model

    model = build_model(job.config, job.data).eval()
    model.load_state_dict(state)
    x, y = torch.as_tensor(job.data.x_test), torch.as_tensor(job.data.y_test)
    with torch.no_grad():
        out = model(x)
    losses = F.cross_entropy(out, y, reduction="none").double()
    shard_means = [part.mean().item() for part in np.array_split(losses.numpy(), shards)]
    return {"test/loss": losses.mean().item(),
            "test/accuracy": (out.argmax(1) == y).double().mean().item(),
            "mean_of_shard_means": sum(shard_means) / shards}


def count_allreduce_rounds(ddp_model) -> list[int]:
    """The buckets DDP all-reduces, one entry per round (a comm hook that records, then runs
    DDP's default all-reduce)."""
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    rounds: list[int] = []

    def counting_hook(state, bucket):
        rounds.append(bucket.index())
        return allreduce_hook(None, bucket)

    ddp_model.register_comm_hook(None, counting_hook)
    return rounds


# Environment variables read when the interpreter or torch starts: a child of the fork server
# (tests/cli_zygote.py) would not see them, so a command given one runs as a real subprocess.
STARTUP_ENV = ("LD_", "PYTHON", "OMP_", "MKL_", "KMP_", "ONEDNN_", "DNNL_", "TORCH_", "CUDA_",
               "MALLOC_", "GLIBC_")


def run_cli(*args: str, cwd: Path, env: dict | None = None, timeout: float = 300,
            check: bool = False, python_args: Sequence[str] = (),
            fresh: bool = False) -> subprocess.CompletedProcess:
    """`python [python_args] train.py <args>` from `cwd`, with the tracking store defaulting to
    `cwd`. It runs as a child of the fork server (tests/cli_zygote.py: torch, MLflow and Hydra
    already imported) unless `fresh`, `python_args`, an interpreter-start variable in `env`, or
    STEPWISE_TEST_FRESH=1 asks for a new interpreter."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "HYDRA_"))}
    full_env.update(env or {})
    argv = [str(ROOT / "train.py"), *args]
    if (fresh or python_args or os.environ.get("STEPWISE_TEST_FRESH") == "1"
            or any(k.startswith(STARTUP_ENV) and k != "PYTHONPATH" for k in env or {})):
        proc = subprocess.run([sys.executable, *python_args, *argv], cwd=cwd, env=full_env,
                              capture_output=True, text=True, timeout=timeout)
    else:
        proc = _zygote().run(argv, cwd=cwd, env=full_env, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


class _Zygote:
    """The client of tests/cli_zygote.py: one server per test process, started on first use."""

    def __init__(self):
        import tempfile

        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("MLFLOW_", "HYDRA_")) and k != "PYTHONPATH"}
        read, write = os.pipe()
        self.server = subprocess.Popen(
            [sys.executable, str(ROOT / "tests" / "cli_zygote.py"), str(write)],
            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, env=env, pass_fds=(write,), text=True)
        os.close(write)
        self.answers, self.pending = read, b""
        self.scratch = Path(tempfile.mkdtemp(prefix="cli-zygote-"))
        if self._answer(timeout=300).get("ready") is not True:
            raise RuntimeError("tests/cli_zygote.py did not start")

    def _answer(self, timeout: float | None = None) -> dict:
        """The server's next answer; {} if none came within `timeout` seconds."""
        while b"\n" not in self.pending:
            if not select.select([self.answers], [], [], timeout)[0]:
                return {}
            chunk = os.read(self.answers, 4096)
            if not chunk:
                raise RuntimeError("tests/cli_zygote.py exited")
            self.pending += chunk
        line, self.pending = self.pending.split(b"\n", 1)
        return json.loads(line)

    def run(self, argv: list[str], cwd: Path, env: dict, timeout: float):
        out, err = self.scratch / "stdout", self.scratch / "stderr"
        request = {"argv": argv, "cwd": str(cwd), "env": env, "stdout": str(out), "stderr": str(err)}
        self.server.stdin.write(json.dumps(request) + "\n")
        self.server.stdin.flush()
        pid = self._answer()["pid"]
        answer = self._answer(timeout)
        if not answer:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)  # the job and every process it started
            self._answer()
            raise subprocess.TimeoutExpired(argv, timeout, out.read_text(), err.read_text())
        status = answer["status"]
        return subprocess.CompletedProcess([sys.executable, *argv], status, out.read_text(),
                                           err.read_text())

    def close(self):
        os.close(self.answers)
        self.server.stdin.close()
        self.server.wait(timeout=60)


_SERVER: list[_Zygote] = []


def _zygote() -> _Zygote:
    if not _SERVER:
        _SERVER.append(_Zygote())
    return _SERVER[0]


def pytest_collection_modifyitems(config, items):
    """Tests under tests/unit are marked `unit`."""
    for item in items:
        if "tests/unit/" in item.nodeid:
            item.add_marker(pytest.mark.unit)


def pytest_sessionfinish(session, exitstatus):
    while _SERVER:
        _SERVER.pop().close()


@contextlib.contextmanager
def serve_mlflow(root: Path, *args: str, env: dict | None = None):
    """A real `mlflow server <args>` on a free loopback port, with its store in `root`: yields
    its URI once /health answers (polled), and is always stopped (tests/mlflow_server.py)."""
    from tests.mlflow_server import MlflowServer

    server = MlflowServer(root, extra_args=args, env={**os.environ, **(env or {})})
    try:
        # minutes when the machine is busy: a bound, not a wait
        yield server.start(timeout=300).uri
    finally:
        server.stop()


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    """A fresh directory to start commands from (its mlflow.db and outputs/ are the test's)."""
    return tmp_path
