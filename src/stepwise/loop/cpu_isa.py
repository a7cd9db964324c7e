"""Half precision on CPUs that advertise AMX but trap it.

Some virtual machines report `amx_bf16`/`amx_tile` in /proc/cpuinfo while executing an AMX
instruction kills the process with SIGILL: oneDNN, which torch uses for bfloat16 and float16
matmuls on CPU, picks its AMX kernels there, and `trainer.precision=bf16` dies without a word.
oneDNN reads `ONEDNN_MAX_CPU_ISA` once, at its first use in a process (any float32 matmul counts),
so the cap must be set before the first torch operation: `guard()` is called at the start of a
run (and of the test session), decides with a tiny half-precision matmul in a subprocess, and
caches the answer per machine and torch version. No torch import here: the probe is a child.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import signal
import subprocess
import sys
from pathlib import Path

log = logging.getLogger(__name__)

CAP = "AVX512_CORE_BF16"  # the newest oneDNN ISA without AMX that still has bfloat16 instructions
PROBE = """
import torch
with torch.autocast("cpu", dtype=getattr(torch, {dtype!r})):
    torch.nn.Linear(64, 128)(torch.randn(32, 64))
"""


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.partition(":")[2].split())
    return set()


def _cache_file(dtype: str) -> Path:
    import importlib.metadata

    try:
        torch_version = importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        torch_version = "?"
    model = next((line for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), "")
    # LD_PRELOAD is in the key: a preloaded library can change what the CPU is allowed to run.
    key = "|".join([model, " ".join(sorted(_cpu_flags())), platform.release(), torch_version,
                    dtype, os.environ.get("LD_PRELOAD", "")])
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "stepwise"
    return root / f"cpu-amx-{dtype}-{digest}.json"


def amx_traps(dtype: str = "bfloat16") -> bool:
    """Whether a `dtype` autocast matmul dies with SIGILL on this machine (cached)."""
    cache = _cache_file(dtype)
    try:
        return bool(json.loads(cache.read_text())["traps"])
    except (OSError, ValueError, KeyError):
        pass
    env = {k: v for k, v in os.environ.items() if k != "ONEDNN_MAX_CPU_ISA"}
    proc = subprocess.run([sys.executable, "-c", PROBE.format(dtype=dtype)], env=env,
                          capture_output=True)
    traps = proc.returncode == -signal.SIGILL
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps({"traps": traps, "returncode": proc.returncode}))
    except OSError:
        pass  # an unwritable cache costs a probe next time, nothing else
    return traps


def guard(dtype: str = "bfloat16", why: str = "", warn: bool = True) -> bool:
    """Cap oneDNN below AMX if this CPU advertises AMX but traps it. Call before any torch op.

    Args:
        dtype: the autocast dtype the run will use on the CPU (`bfloat16` or `float16`).
        why: the config setting that asked for it, for the warning line.
        warn: say so in one warning line (the rank that speaks for the job).

    Returns:
        Whether the cap was set now.
    """
    if "ONEDNN_MAX_CPU_ISA" in os.environ or "amx_tile" not in _cpu_flags():
        return False  # the user chose a cap already, or there is no AMX to trap
    if not amx_traps(dtype):
        return False
    os.environ["ONEDNN_MAX_CPU_ISA"] = CAP  # inherited by the DDP workers stepwise spawns
    if warn:
        log.warning("%sthis CPU advertises AMX but executing it traps (SIGILL in a probe): oneDNN is "
                "capped at %s (ONEDNN_MAX_CPU_ISA) for this run", f"{why}: " if why else "", CAP)
    return True


def guard_run(precision: str, device: str, warn: bool = True) -> bool:
    """`guard` for a run's `trainer.precision` and `trainer.device`, if it autocasts on a CPU."""
    dtype = {"bf16": "bfloat16", "16-mixed": "float16"}.get(precision)
    if dtype is None or device == "cuda":
        return False
    if device == "auto":
        import torch  # importing torch runs no oneDNN kernel: the cap can still be set after it

        if torch.cuda.is_available():
            return False
    return guard(dtype, f"trainer.precision={precision}", warn)
