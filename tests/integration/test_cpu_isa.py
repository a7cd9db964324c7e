"""Half precision on a CPU that advertises AMX but traps it (SIGILL): reproduced here by a
preloaded library that tells oneDNN the kernel granted AMX tile data when it did not, which is
what such a machine looks like from inside. The run, DDP workers and the suite must not die."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys

import pytest

from stepwise.loop import cpu_isa
from tests.conftest import ROOT, run_cli

pytestmark = pytest.mark.cli

BF16_MATMUL = ("import torch\nwith torch.autocast('cpu', dtype=torch.bfloat16):\n"
               "    torch.nn.Linear(64, 128)(torch.randn(32, 64))\n")


@pytest.fixture(scope="module")
def trapping_env(tmp_path_factory) -> dict[str, str]:
    """The environment of a machine whose AMX traps: LD_PRELOAD of the fake permission."""
    if "amx_tile" not in cpu_isa._cpu_flags():
        pytest.skip("this CPU has no AMX: there is nothing to trap")
    compiler = shutil.which(os.environ.get("CC", "cc"))
    if compiler is None:  # .ci/run installs one: CI must run these tests, not skip them
        (pytest.fail if os.environ.get("CI") == "true" else pytest.skip)(
            "a C compiler is needed to build the AMX trap (apt-get install gcc)")
    build = tmp_path_factory.mktemp("amx")
    library = build / "fake_amx_perm.so"
    subprocess.run([compiler, "-shared", "-fPIC", "-O2", "-o", str(library),
                    str(ROOT / "tests" / "fixtures" / "fake_amx_perm.c"), "-ldl"], check=True)
    env = {k: v for k, v in os.environ.items() if k != "ONEDNN_MAX_CPU_ISA"}
    env.update(LD_PRELOAD=str(library), XDG_CACHE_HOME=str(build / "cache"),
               PYTHONPATH=str(ROOT))
    # The premise: under it, a bare bfloat16 matmul dies as it does on such a machine.
    bare = subprocess.run([sys.executable, "-c", BF16_MATMUL], env=env, capture_output=True)
    assert bare.returncode == -signal.SIGILL, bare
    return env


@pytest.mark.parametrize("args", [("trainer.precision=bf16",),
                                  ("trainer.precision=bf16", "parallel=ddp", "parallel.nproc=2"),
                                  ("trainer.precision=16-mixed",)],
                         ids=["bf16", "bf16-ddp", "16-mixed"])
def test_half_precision_trains_where_amx_traps(trapping_env, workdir, args):
    proc = run_cli(*args, "trainer.max_steps=5", "trainer.log_every_n_steps=1", "logger=none",
                   "trainer.progress_bar=false", cwd=workdir, env=trapping_env)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    assert "executed as planned: 5 optimizer steps" in output
    warnings = [line for line in output.splitlines() if "advertises AMX but" in line]
    if args[0] == "trainer.precision=16-mixed" and not warnings:
        return  # float16 uses AMX only where the CPU has AMX-FP16 (this one may not)
    assert len(warnings) == 1, output  # one line, from the rank that speaks for the job
    assert f"{args[0]}: this CPU advertises AMX but executing it traps" in warnings[0]


def test_the_suite_runs_bf16_where_amx_traps(trapping_env):
    """The README's test command on such a machine: the in-process bf16 test passes."""
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           "tests/integration/test_fast_path.py::"
                           "test_bf16_autocasts_the_forward_and_keeps_float32_weights"],
                          cwd=ROOT, env=trapping_env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "1 passed" in proc.stdout


def test_the_probe_is_cached_per_machine(trapping_env, tmp_path):
    env = {**trapping_env, "XDG_CACHE_HOME": str(tmp_path)}
    code = "from stepwise.loop import cpu_isa; print(cpu_isa.amx_traps())"
    first = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert first.stdout.strip() == "True", first.stderr
    [cached] = list((tmp_path / "stepwise").glob("cpu-amx-bfloat16-*.json"))
    assert '"traps": true' in cached.read_text()
    # Without the preloaded library the CPU may run AMX: another key, probed again.
    env.pop("LD_PRELOAD")
    second = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert second.stdout.strip() in ("True", "False"), second.stderr
    assert len(list((tmp_path / "stepwise").glob("cpu-amx-bfloat16-*.json"))) == 2
