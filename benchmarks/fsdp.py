"""parallel=fsdp against a hand-written FSDP2 loop: workload W7 of benchmarks/overhead.py.

    .venv/bin/python benchmarks/fsdp.py [--repeats 9] [--seconds 5] [--device cuda] [--no-mlflow]

W7 is W4 (DDP, MLP 64-2048-2048-10 on synthetic data, b=16, accum=8, W=2: E=256) under FSDP2:
each Linear and the root sharded with `fully_shard`. stepwise runs as `python train.py
parallel=fsdp` would, minus start-up (`build_trainer` + `Trainer.fit`, MLflow to a sqlite store
at the default `trainer.log_every_n_steps`, the plan check at the end). The hand-written loop, in
the same 2 processes, is what a PyTorch user writes with FSDP2: the same `fully_shard` calls,
`set_requires_gradient_sync(False)` on all micro-steps but the last, `cross_entropy / accum` on
stepwise's sample order (the same trajectory), `optimizer.step()`, no logging. Each repeat times
one of each, alternating which goes first, from the end of their first optimizer step; prints
samples/s (median, min-max) and the ratio stepwise / hand-written.
"""

from __future__ import annotations

import sys

from overhead import main

if __name__ == "__main__":
    sys.argv[1:1] = ["--workloads", "W7"]  # a later --workloads still wins
    main()
