"""A free loopback port for a server or rendezvous a test starts.

Chosen outside the kernel's ephemeral range (32768-60999 here), never by binding port 0: a port
the kernel hands out can be handed out again, to any outgoing connection (gloo's, an MLflow
client's), between the test choosing it and its server binding it. That happened once in CI:
`mlflow server` died with "address already in use". Below 20000 it also stays clear of the
SLURM jobs' 20000 + job id % 20000 rendezvous ports."""

from __future__ import annotations

import random
import socket

_CHOOSE = random.SystemRandom()  # not the `random` module's state, which training seeds


def free_port(low: int = 10_000, high: int = 20_000) -> int:
    """A port in [low, high) that nothing on 127.0.0.1 holds now (keep `high` below 32768)."""
    for _ in range(1000):
        port = _CHOOSE.randrange(low, high)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {low}-{high - 1} on 127.0.0.1")
