"""DDP with accum=8 on 2 gloo processes: stepwise's loop with no_sync (one all-reduce per optimizer
step) against the same loop syncing every micro-step, alternating in one invocation.

    .venv/bin/python benchmarks/ddp_no_sync.py [--repeats 5] [--steps 30]

Workload W4 of issue 8: MLP 64-2048-2048-10 on synthetic data, b=16, accum=8, W=2 (E=256).
Prints samples/s per variant (median of the repeats, with min-max) and the ratio.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

from stepwise.contract.dist_env import DistEnv
from stepwise.parallel.replica import start_replica, stop_replica
from stepwise.run.build import build_trainer
from stepwise.run.job import prepare
from stepwise.tracking.tracker import NullTracker

OVERRIDES = ["parallel=ddp", "parallel.nproc=2", "logger=none", "data=synthetic",
             "data.num_features=64", "data.train_samples=16384", "data.val_samples=0",
             "model.hidden_sizes=[2048,2048]", "data.batch_size=16", "accum=8",
             "trainer.progress_bar=false", "trainer.device=cpu"]


def _compose(steps: int):
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from stepwise.main import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[*OVERRIDES, f"trainer.max_steps={steps}"])
    return OmegaConf.to_object(cfg)


def _worker(rank: int, port: int, steps: int, repeats: int, out: str) -> None:
    torch.set_num_threads(1)  # 2 processes on 2 cores
    env = DistEnv("torchrun", rank, rank, 2, 2, 0, "127.0.0.1", port)
    os.environ.update(env.torch_env())
    job = prepare(_compose(steps), Path(out), Path(out), env)
    replica = start_replica(job.world, job.config.parallel, "cpu")
    times: dict[str, list[float]] = {"no_sync": [], "sync_every_micro_step": []}
    for _ in range(repeats):
        for variant in times:  # alternate, so that drift hits both alike
            replica.sync_every_micro_step = variant == "sync_every_micro_step"
            trainer = build_trainer(job, replica, NullTracker())
            torch.distributed.barrier()
            start = time.perf_counter()
            trainer.fit()
            torch.distributed.barrier()
            times[variant].append(job.plan.total_samples / (time.perf_counter() - start))
    if rank == 0:
        lines = []
        for variant, rates in times.items():
            lines.append(f"{variant:>22}: {statistics.median(rates):9.0f} samples/s "
                         f"(min {min(rates):.0f}, max {max(rates):.0f}, {repeats} repeats)")
        ratio = statistics.median(times["no_sync"]) / statistics.median(
            times["sync_every_micro_step"])
        lines.append(f"{'no_sync speed-up':>22}: {ratio:.2f}x")
        print("\n".join(lines))
    stop_replica(replica)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps per measurement")
    args = parser.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = Path("outputs/benchmarks")
    out.mkdir(parents=True, exist_ok=True)
    print(f"DDP gloo W=2, b=16, accum=8 (E=256), MLP 64-2048-2048-10, {args.steps} optimizer steps"
          f" per measurement, {os.cpu_count()} CPUs, torch {torch.__version__}")
    mp.spawn(_worker, args=(port, args.steps, args.repeats, str(out)), nprocs=2)


if __name__ == "__main__":
    main()
