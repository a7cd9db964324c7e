"""Start-up time of `python train.py` next to `import torch`: dry runs and the first optimizer step.

    .venv/bin/python benchmarks/startup.py [--repeats 5]

Every command runs in a fresh process started from a temporary directory, with Hydra's run
directories and the default MLflow store (sqlite:///mlflow.db) in there, so nothing is written
into the repository. Each command runs once untimed first (it creates the MLflow store and warms
the file cache), then `--repeats` times; the table shows the median, the min-max and the median
over `import torch`. Other commands are timed to their exit; the first optimizer step from the
start of the process to the end of the first `optimizer.step()`: a global optimizer step hook
prints the wall clock and ends the process there (torch is imported before train.py to install
it; train.py imports it anyway). The reference row is the same for a bare PyTorch script: torch
itself imports torch._dynamo (about a second) when the first optimizer is built.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TRAIN = str(ROOT / "train.py")

# Ends the process at the end of the first optimizer step, printing when that was.
STEP_HOOK = """
import os, runpy, sys, time
from torch.optim.optimizer import register_optimizer_step_post_hook

def first_step(optimizer, args, kwargs):
    print(f"first optimizer step at {time.time()!r}", file=sys.stderr, flush=True)
    os._exit(0)

register_optimizer_step_post_hook(first_step)
"""
# `python -c FIRST_STEP train.py <overrides>` runs train.py as `python train.py <overrides>` would.
FIRST_STEP = STEP_HOOK + """
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""
# The floor for any PyTorch training script: import torch, build an optimizer (its first use
# imports torch._dynamo), take one step.
BARE_TORCH = STEP_HOOK + """
import torch
model = torch.nn.Linear(64, 10)
optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
model(torch.randn(32, 64)).square().mean().backward()
optimizer.step()
"""

QUIET = ["trainer.progress_bar=false"]
COMMANDS = [  # (label, python arguments, timed to: "exit" or "first step")
    ("import torch", ["-c", "import torch"], "exit"),
    ("train.py dry_run=true logger=none", [TRAIN, "dry_run=true", "logger=none"], "exit"),
    ("train.py dry_run=true", [TRAIN, "dry_run=true"], "exit"),
    ("train.py logger=none: first step", ["-c", FIRST_STEP, TRAIN, "logger=none", *QUIET],
     "first step"),
    ("train.py: first step", ["-c", FIRST_STEP, TRAIN, *QUIET], "first step"),
    ("bare torch: first step (reference)", ["-c", BARE_TORCH], "first step"),
]


def time_once(args: list[str], until: str, workdir: Path, run: int) -> float:
    """Seconds from starting `python <args>` in `workdir` to its exit or its first step."""
    if TRAIN in args:  # each run its own Hydra run directory
        args = [*args, f"hydra.run.dir={workdir / 'outputs' / str(run)}"]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "HYDRA_"))}
    started = time.time()
    proc = subprocess.run([sys.executable, *args], cwd=workdir, env=env, capture_output=True,
                          text=True)
    ended = time.time()
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): python {' '.join(args)}\n{proc.stderr}")
    if until == "exit":
        return ended - started
    marks = [line for line in proc.stderr.splitlines() if line.startswith("first optimizer step")]
    if not marks:
        raise SystemExit(f"no optimizer step: python {' '.join(args)}\n{proc.stderr}")
    return float(marks[0].rsplit(" ", 1)[1]) - started


def measure(args: list[str], until: str, repeats: int) -> list[float]:
    with tempfile.TemporaryDirectory(prefix="stepwise-startup-") as tmp:
        workdir = Path(tmp)
        time_once(args, until, workdir, run=0)  # warm-up: MLflow store, file cache
        return [time_once(args, until, workdir, run=i) for i in range(1, repeats + 1)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    repeats = parser.parse_args().repeats
    rows = []
    for label, args, until in COMMANDS:
        times = measure(args, until, repeats)
        rows.append((label, statistics.median(times), min(times), max(times)))
        print(f"  measured {label}", file=sys.stderr, flush=True)
    torch_s = rows[0][1]
    print(f"\n{'command':<38} {'median s':>9} {'min-max s':>12} {'x import torch':>15}")
    for label, median, low, high in rows:
        print(f"{label:<38} {median:>9.2f} {f'{low:.2f}-{high:.2f}':>12} {median / torch_s:>15.2f}")
    print(f"\n{repeats} runs each after one warm-up, {os.cpu_count()} CPUs, python "
          f"{sys.version.split()[0]}")


if __name__ == "__main__":
    main()
