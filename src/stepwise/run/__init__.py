"""One job in one process: config -> validated `Job` (probes included), the run directory,
building the parts, resuming, checkpoints, `data.batch_size=auto`, spawning ranks, running the
job and owning its MLflow run, and the models a finished run logs.

Layer 8 of 8 (the top subpackage): may import `contract`, `config`, `parallel`, `data`, `models`,
`loop`, `tracking`. Only `main.py` and `__main__.py`, at the package root, sit above it.
"""
