"""One job in one process: config -> validated `Job` (probes included), the run directory,
building the parts, resuming, checkpoints, `data.batch_size=auto`, spawning ranks, running the
job and owning its MLflow run, and the models a finished run logs; a finished run's checkpoint
evaluated or run on a split (`stepwise eval`, `stepwise predict`).

Layer 9 of 9 (the top subpackage): may import `contract`, `config`, `parallel`, `data`, `models`,
`loop`, `callbacks`, `tracking`. Only the entry points at the package root (`main.py`, `__main__.py`, and
`eval.py` and `predict.py` for a finished run) sit above it.
"""
