"""The training loop: the `Trainer` (windows -> train_step -> reads of the device -> checkpoints
-> validation and the monitor), what it is given and counts, its step log, exact validation,
precision, stop signals and the CPU half-precision guard.

Layer 6 of 9: may import `contract`, `config`, `parallel`, `data`, `models`.
"""
