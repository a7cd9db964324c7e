"""stepwise's training loop against a hand-written PyTorch loop on identical work, alternating.

    .venv/bin/python benchmarks/overhead.py [--workloads W1,W2,W3,W4] [--repeats 9] [--seconds S]
    python benchmarks/overhead.py --device cuda --workloads W3,R18 --precision bf16 --channels-last

W1: MLP 64-512-512-10 on digits, b=32.            W2: the same with accum=8.
W3: CNN (32, 64) on synthetic 3x32x32, b=64, accum=4.
W4: DDP, 2 gloo processes, MLP 64-2048-2048-10 on synthetic 64 features, b=16, accum=8.
W7: W4 under FSDP2 (each Linear and the root `fully_shard`ed; benchmarks/fsdp.py runs it).
W5: tiny_lm (2 layers, width 64) on tinytext (padded sequences of 8-256 characters, the loss
    per token), b=16, accum=2.   W6: the same in DDP, 2 gloo processes, b=8, accum=2.
R18: torchvision's ResNet-18 on synthetic 3x32x32, b=256 (for GPUs).

Both loops train the same model (same seed) with the same optimizer on the same tensors, for
the same number of optimizer steps. stepwise runs as `python train.py` would, minus start-up:
`build_trainer` + `Trainer.fit`, with MLflow logging to a sqlite store (default
`trainer.log_every_n_steps`) and its plan check at the end. The hand-written loop is the lean
one a PyTorch user writes: a permutation per epoch (stepwise's, so that the trajectories
are the same), slicing, mean loss / accum, `no_sync` in DDP (`set_requires_gradient_sync` in FSDP),
no logging; it applies the same --precision (autocast), --channels-last and --compile. Each
repeat times one of each, in alternating order; prints samples/s (median,
min-max) and the ratio stepwise / hand-written.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import socket
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp
from torch.nn import functional as F

from stepwise.contract.dist_env import DistEnv
from stepwise.contract.sampler import epoch_permutation
from stepwise.loop.precision import AUTOCAST
from stepwise.parallel.replica import Replica, start_replica, stop_replica
from stepwise.run.build import build_trainer
from stepwise.run.job import Job, prepare

# Full windows only (the hand-written loop drops an epoch's remainder too); no epoch budget.
COMMON = ["trainer.progress_bar=false", "trainer.checkpoint_every_n_steps=0", "data.drop_last=true",
          "trainer.max_epochs=-1"]
TOKENS = ["data=tinytext", "model=tiny_lm", "loss=cross_entropy", "metrics=none", "data.val=null"]
DDP_WORKLOADS = ("W4", "W6", "W7")  # 2 processes
WORKLOADS = {
    "W1": ("MLP 64-512-512-10, digits, b=32", ["data.val_fraction=0", "model.hidden_sizes=[512,512]",
                                              "data.batch_size=32"]),
    "W2": ("MLP 64-512-512-10, digits, b=32, accum=8",
           ["data.val_fraction=0", "model.hidden_sizes=[512,512]", "data.batch_size=32", "accum=8"]),
    "W3": ("CNN (32,64), synthetic 3x32x32, b=64, accum=4",
           ["data=synthetic", "data.image_shape=[3,32,32]", "data.train_samples=4096",
            "data.val_samples=0", "model=cnn", "data.batch_size=64", "accum=4"]),
    "W4": ("DDP gloo W=2, MLP 64-2048-2048-10, synthetic, b=16, accum=8",
           ["parallel=ddp", "parallel.nproc=2", "data=synthetic", "data.num_features=64",
            "data.train_samples=16384", "data.val_samples=0", "model.hidden_sizes=[2048,2048]",
            "data.batch_size=16", "accum=8"]),
    "W7": ("FSDP gloo W=2, MLP 64-2048-2048-10, synthetic, b=16, accum=8",
           ["parallel=fsdp", "parallel.nproc=2", "data=synthetic", "data.num_features=64",
            "data.train_samples=16384", "data.val_samples=0", "model.hidden_sizes=[2048,2048]",
            "data.batch_size=16", "accum=8"]),
    "W5": ("tiny_lm on tinytext, per-token loss, b=16, accum=2", [*TOKENS, "data.batch_size=16",
                                                                 "accum=2"]),
    "W6": ("DDP gloo W=2, tiny_lm on tinytext, per-token loss, b=8, accum=2",
           ["parallel=ddp", "parallel.nproc=2", *TOKENS, "data.batch_size=8", "accum=2"]),
    "R18": ("ResNet-18, synthetic 3x32x32, b=256",
            ["data=synthetic", "data.image_shape=[3,32,32]", "data.train_samples=16384",
             "data.val_samples=0", "model=torchvision", "model.name=resnet18",
             "data.batch_size=256"]),
}
# Seconds per measurement by default: W3 and W4 take about 100 ms per optimizer step, and their
# measurements must hold enough steps that run-to-run noise and the end of fit (a final
# all-reduce or two, the MLflow flush: about 10-50 ms once per run) do not dominate.
SECONDS = {"W3": 5.0, "W4": 5.0, "W5": 5.0, "W6": 5.0, "W7": 5.0}


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import OmegaConf

    from stepwise.main import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = hydra_compose(config_name="config", overrides=overrides)
    return OmegaConf.to_object(cfg)


def steps_for(job: Job, seconds: float, replica: Replica) -> int:
    """Optimizer steps that take about `seconds` in the hand-written loop (timed once)."""
    run_handwritten(job, replica, 5)  # warm-up
    per_step = run_handwritten(job, replica, 21) / 20
    steps = torch.tensor(max(10, int(seconds / per_step)), dtype=torch.float64)
    return int(replica.sum(steps).item() / replica.loader_ranks)


def run_stepwise(job: Job, replica: Replica, tracking_uri: str | None) -> float:
    """Seconds for stepwise's `fit` after its first optimizer step (the MLflow run is opened
    before; the first step, with any compilation, is not timed)."""
    from stepwise.tracking.tracker import MlflowTracker, NullTracker

    tracker = NullTracker()
    if tracking_uri is not None and replica.is_main:
        tracker = MlflowTracker(tracking_uri, "benchmarks")
        tracker.start_system_metrics(job.config.logger.system_metrics_interval_s)  # as a run does
    trainer = build_trainer(job, replica, tracker)
    started: list[float] = []

    def first_step_done(optimizer, args, kwargs) -> None:
        if not started:
            barrier(replica)
            started.append(time.perf_counter())

    trainer.optimizer.register_step_post_hook(first_step_done)
    trainer.fit()
    tracker.sync_while_up()  # what the background thread still had to send is timed too
    barrier(replica)
    elapsed = time.perf_counter() - started[0]
    tracker.finish("FINISHED")
    return elapsed


def run_handwritten(job: Job, replica: Replica, steps: int) -> float:
    """Seconds for `steps` optimizer steps of the lean loop a PyTorch user writes by hand, from
    the end of its first step."""
    from hydra.utils import instantiate

    if job.items is not None:  # W5, W6: sequences, the loss per token
        from token_loop import run_handwritten_tokens

        return run_handwritten_tokens(job, replica, steps, barrier)

    cfg, plan = job.config, job.plan
    fast = cfg.trainer
    torch.manual_seed(cfg.seed)
    tree = job.config_dict()
    model = instantiate(tree["model"], input_shape=job.data.input_shape,
                        num_outputs=job.data.num_outputs).to(replica.device)
    if fast.channels_last:
        model = model.to(memory_format=torch.channels_last)
    model = replica.wrap(model)
    model = torch.compile(model) if fast.compile else model
    optimizer = instantiate(tree["optim"])(model.parameters(), lr=plan.lr)
    scaler = torch.amp.GradScaler(replica.device.type) if fast.precision == "16-mixed" else None
    autocast = torch.autocast(replica.device.type, dtype=AUTOCAST.get(fast.precision),
                              enabled=fast.precision in AUTOCAST)
    x = torch.as_tensor(job.data.x_train)
    y = torch.as_tensor(job.data.y_train)
    cuda = replica.device.type == "cuda"
    b, accum, world, rank = plan.per_device_batch_size, plan.accum, plan.world_size, replica.rank
    window = b * accum * world
    start, done, epoch = 0.0, 0, 0
    while done < steps:
        # stepwise's order of the samples, so that both loops follow the same trajectory (and
        # meet the same denormal numbers, which slow CPUs down by up to 40%).
        perm = torch.from_numpy(epoch_permutation(len(x), cfg.seed, epoch))
        epoch += 1
        for first in range(0, len(x) - window + 1, window):
            for j in range(accum):
                idx = perm[first + (j * world + rank) * b:first + (j * world + rank + 1) * b]
                xb, yb = x[idx], y[idx]
                if cuda:
                    xb = xb.pin_memory().to(replica.device, non_blocking=True)
                    yb = yb.pin_memory().to(replica.device, non_blocking=True)
                if fast.channels_last:
                    xb = xb.contiguous(memory_format=torch.channels_last)
                with gradient_sync(model, replica, sync=j == accum - 1):
                    with autocast:
                        loss = F.cross_entropy(model(xb), yb) / accum
                    (scaler.scale(loss) if scaler else loss).backward()
            if scaler:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            done += 1
            if done == 1:  # timed from the end of the first step, as stepwise is
                barrier(replica)
                start = time.perf_counter()
            if done == steps:
                break
    barrier(replica)
    return time.perf_counter() - start


def gradient_sync(model, replica: Replica, sync: bool):
    """The hand-written no_sync: DDP's context manager, FSDP2's switch, nothing in one process
    (the wrapping itself is `Replica.wrap`'s: DDP, or `fully_shard` per Linear and the root)."""
    if replica.mode == "fsdp":
        model.set_requires_gradient_sync(sync)
    elif replica.mode == "ddp" and not sync:
        return model.no_sync()
    return contextlib.nullcontext()


def barrier(replica: Replica) -> None:
    if replica.device.type == "cuda":
        torch.cuda.synchronize(replica.device)
    if replica.distributed:  # ddp, fsdp (benchmarks/fsdp.py)
        torch.distributed.barrier()


def measure(name: str, overrides: list[str], replica: Replica, env: DistEnv, args, out: Path
            ) -> list[str]:
    """Alternate the two loops `args.repeats` times; the report lines (on the main rank)."""
    overrides = [*COMMON, *settings(args), *overrides, *args.set]
    probe = prepare(compose([*overrides, "trainer.max_steps=1"]), out, out, env)
    seconds = SECONDS.get(name, 2.0) if args.seconds is None else args.seconds
    steps = steps_for(probe, seconds, replica)
    job = prepare(compose([*overrides, f"trainer.max_steps={steps}"]), out, out, env)
    assert job.plan.total_samples == steps * job.plan.effective_batch_size  # full windows only
    samples = (steps - 1) * job.plan.effective_batch_size  # after the first step
    uri = None if args.no_mlflow else f"sqlite:///{out / 'mlflow.db'}"
    rates: dict[str, list[float]] = {"stepwise": [], "hand-written": []}
    for repeat in range(args.repeats):
        order = ["stepwise", "hand-written"][:: 1 if repeat % 2 == 0 else -1]
        for variant in order:
            if variant == "stepwise":
                seconds = run_stepwise(job, replica, uri)
            else:
                seconds = run_handwritten(job, replica, steps)
            rates[variant].append(samples / seconds)
    median = {k: statistics.median(v) for k, v in rates.items()}
    lines = [f"{name}: {WORKLOADS[name][0]}; {steps - 1} optimizer steps ({samples} samples) "
             f"timed after the first, {args.repeats} repeats"]
    for variant, values in rates.items():
        lines.append(f"  {variant:>12}: {median[variant]:9.0f} samples/s "
                     f"(min {min(values):.0f}, max {max(values):.0f})")
    ratios = [s / h for s, h in zip(rates["stepwise"], rates["hand-written"])]
    lines.append(f"  {'ratio':>12}: {median['stepwise'] / median['hand-written']:.3f} "
                 f"(per repeat: min {min(ratios):.3f}, max {max(ratios):.3f})")
    if job.items is not None:
        from token_loop import token_lines

        lines += token_lines(job, steps, median["stepwise"], median["hand-written"])
    return lines


def settings(args) -> list[str]:
    """The fast-path keys both loops apply."""
    return [f"trainer.device={args.device}", f"trainer.precision={args.precision}",
            f"trainer.channels_last={str(args.channels_last).lower()}",
            f"trainer.compile={str(args.compile).lower()}"]


def _ddp_worker(rank: int, name: str, port: int, args, out: str, queue) -> None:
    torch.set_num_threads(1)  # 2 processes on 2 cores
    env = DistEnv("torchrun", rank, rank, 2, 2, 0, "127.0.0.1", port)
    os.environ.update(env.torch_env())
    overrides = WORKLOADS[name][1]
    job = prepare(compose([*COMMON, *settings(args), *overrides, "trainer.max_steps=1"]),
                  Path(out), Path(out), env)
    replica = start_replica(job.world, job.config.parallel, args.device)
    lines = measure(name, overrides, replica, env, args, Path(out))
    if rank == 0:
        queue.put(lines)
    stop_replica(replica)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", default="W1,W2,W3,W4")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--seconds", type=float, default=None,
                        help="about how long one measurement of one loop takes (default: 2, "
                             "5 for W3 and W4)")
    parser.add_argument("--no-mlflow", action="store_true", help="stepwise without MLflow")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override for both loops' job (e.g. "
                             "trainer.log_every_n_steps=50), repeatable")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--precision", default="32", choices=("32", "bf16", "16-mixed"))
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--compile", action="store_true")
    args = parser.parse_args()
    device = (torch.cuda.get_device_name() if args.device == "cuda"
              else f"{torch.get_num_threads()} intra-op threads (W4, W6, W7: 1 per process)")
    print(f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
          f"torch {torch.__version__}, {device}; precision {args.precision}, channels_last "
          f"{args.channels_last}, compile {args.compile}")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        for name in args.workloads.split(","):
            if name in DDP_WORKLOADS:
                with socket.socket() as s:
                    s.bind(("127.0.0.1", 0))
                    port = s.getsockname()[1]
                queue = mp.get_context("spawn").SimpleQueue()
                mp.spawn(_ddp_worker, args=(name, port, args, tmp, queue), nprocs=2)
                lines = queue.get()
            else:
                overrides = WORKLOADS[name][1]
                replica = Replica("single", 0, 1, torch.device(args.device))
                lines = measure(name, overrides, replica, DistEnv(), args, out)
            print("\n".join(lines), flush=True)


if __name__ == "__main__":
    main()
