"""parallel=fsdp against a hand-written FSDP2 loop, same work, same 2 processes, alternating.

    .venv/bin/python benchmarks/fsdp.py [--repeats 5] [--seconds 5] [--device cpu|cuda]

Workload W7: W4 of benchmarks/overhead.py under FSDP: an MLP 64-2048-2048-10 on synthetic data,
b=16, accum=8, W=2 (E=256), each Linear and the root sharded with `fully_shard`. stepwise runs as
`python train.py parallel=fsdp` would, minus start-up (`build_trainer` + `Trainer.fit`, MLflow to
a sqlite store at the default `trainer.log_every_n_steps`, the plan check at the end). The
hand-written loop is what a PyTorch user writes with FSDP2: `fully_shard` on the same modules,
stepwise's sample order (the same trajectory), `set_requires_gradient_sync(False)` on all but
the last micro-step, `cross_entropy / accum`, `optimizer.step()`, no logging. Both are timed
from the end of their first optimizer step. Prints samples/s (median, min-max) and the ratio.
"""

from __future__ import annotations

import argparse
import os
import platform
import socket
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp
from overhead import COMMON, barrier, compose, run_stepwise
from torch.nn import functional as F

from stepwise.dist_env import DistEnv
from stepwise.distributed import Replica, start_replica, stop_replica
from stepwise.job import Job, prepare
from stepwise.sampler import epoch_permutation

W7 = ("FSDP gloo W=2, MLP 64-2048-2048-10, synthetic, b=16, accum=8",
      ["parallel=fsdp", "parallel.nproc=2", "data=synthetic", "data.num_features=64",
       "data.train_samples=16384", "data.val_samples=0", "model.hidden_sizes=[2048,2048]",
       "data.batch_size=16", "accum=8"])


def run_handwritten(job: Job, replica: Replica, steps: int) -> float:
    """Seconds for `steps` optimizer steps of a hand-written FSDP2 loop, after its first."""
    from hydra.utils import instantiate
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    cfg, plan = job.config, job.plan
    torch.manual_seed(cfg.seed)
    tree = job.config_dict()
    model = instantiate(tree["model"], input_shape=job.data.input_shape,
                        num_outputs=job.data.num_outputs).to(replica.device)
    mesh = init_device_mesh(replica.device.type, (plan.world_size,))
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    optimizer = instantiate(tree["optim"])(model.parameters(), lr=plan.lr)
    x, y = torch.as_tensor(job.data.x_train), torch.as_tensor(job.data.y_train)
    b, accum, world, rank = plan.per_device_batch_size, plan.accum, plan.world_size, replica.rank
    window = b * accum * world
    start, done, epoch = 0.0, 0, 0
    while done < steps:
        perm = torch.from_numpy(epoch_permutation(len(x), cfg.seed, epoch))
        epoch += 1
        for first in range(0, len(x) - window + 1, window):
            for j in range(accum):
                idx = perm[first + (j * world + rank) * b:first + (j * world + rank + 1) * b]
                xb, yb = x[idx].to(replica.device), y[idx].to(replica.device)
                model.set_requires_gradient_sync(j == accum - 1)
                loss = F.cross_entropy(model(xb), yb) / accum
                loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            done += 1
            if done == 1:
                barrier(replica)
                start = time.perf_counter()
            if done == steps:
                break
    barrier(replica)
    return time.perf_counter() - start


def _worker(rank: int, port: int, args, out: str, queue) -> None:
    if args.device == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))  # as stepwise's spawn does
    env = DistEnv("torchrun", rank, rank, 2, 2, 0, "127.0.0.1", port)
    os.environ.update(env.torch_env())
    overrides = [*COMMON, f"trainer.device={args.device}", *W7[1]]
    out_dir = Path(out)
    probe = prepare(compose([*overrides, "trainer.max_steps=1"]), out_dir, out_dir, env)
    replica = start_replica(probe.world, probe.config.parallel, args.device)
    run_handwritten(probe, replica, 3)  # warm-up
    per_step = run_handwritten(probe, replica, 11) / 10
    steps = torch.tensor(float(max(10, int(args.seconds / per_step))))
    steps = int(replica.sum(steps).item() / 2)  # the same on both ranks
    job = prepare(compose([*overrides, f"trainer.max_steps={steps}"]), out_dir, out_dir, env)
    samples = (steps - 1) * job.plan.effective_batch_size
    uri = f"sqlite:///{out_dir / 'mlflow.db'}"
    rates: dict[str, list[float]] = {"stepwise": [], "hand-written": []}
    for repeat in range(args.repeats):
        for variant in ["stepwise", "hand-written"][:: 1 if repeat % 2 == 0 else -1]:
            seconds = (run_stepwise(job, replica, uri) if variant == "stepwise"
                       else run_handwritten(job, replica, steps))
            rates[variant].append(samples / seconds)
    if rank == 0:
        queue.put(_report(rates, steps, samples, args.repeats))
    stop_replica(replica)


def _report(rates: dict[str, list[float]], steps: int, samples: int, repeats: int) -> list[str]:
    median = {k: statistics.median(v) for k, v in rates.items()}
    lines = [f"W7: {W7[0]}; {steps - 1} optimizer steps ({samples} samples) timed after the "
             f"first, {repeats} repeats"]
    for variant, values in rates.items():
        lines.append(f"  {variant:>12}: {median[variant]:9.0f} samples/s "
                     f"(min {min(values):.0f}, max {max(values):.0f})")
    ratios = [s / h for s, h in zip(rates["stepwise"], rates["hand-written"])]
    lines.append(f"  {'ratio':>12}: {median['stepwise'] / median['hand-written']:.3f} "
                 f"(per repeat: min {min(ratios):.3f}, max {max(ratios):.3f})")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=5.0,
                        help="about how long one measurement of one loop takes")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    args = parser.parse_args()
    device = torch.cuda.get_device_name() if args.device == "cuda" else "gloo"
    print(f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
          f"torch {torch.__version__}, {device}")
    with tempfile.TemporaryDirectory() as tmp, socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()
        queue = mp.get_context("spawn").SimpleQueue()
        mp.spawn(_worker, args=(port, args, tmp, queue), nprocs=2)
        print("\n".join(queue.get()), flush=True)


if __name__ == "__main__":
    main()
