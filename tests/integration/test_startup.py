"""Start-up: a dry run imports no torch, mlflow, torchvision, submitit or scikit-learn, and a
training run imports mlflow only to open a run (benchmarks/startup.py has the timings)."""

from __future__ import annotations

import json

import pytest

from tests.conftest import run_cli

pytestmark = pytest.mark.cli

# `python -c DRIVER <out.json> train.py <overrides>` runs train.py as `python train.py` would,
# and writes the names of the modules it imported to out.json when the process exits.
DRIVER = """
import atexit, json, runpy, sys
out = sys.argv.pop(1)
atexit.register(lambda: open(out, "w").write(json.dumps(sorted(sys.modules))))
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""
HEAVY = {"torch", "mlflow", "torchvision", "submitit", "sklearn", "scipy", "pandas", "matplotlib"}


def imported_packages(workdir, *overrides: str) -> set[str]:
    """The top-level packages that `python train.py <overrides>` imports."""
    out = workdir / "modules.json"
    run_cli(*overrides, cwd=workdir, check=True, python_args=["-c", DRIVER, str(out)])
    return {name.split(".")[0] for name in json.loads(out.read_text())}


@pytest.mark.smoke
@pytest.mark.parametrize("overrides", [["dry_run=true"], ["dry_run=true", "logger=none"]])
def test_a_dry_run_imports_none_of_the_heavy_packages(workdir, overrides):
    packages = imported_packages(workdir, *overrides)
    assert {"hydra", "numpy", "stepwise"} <= packages
    assert not packages & HEAVY, sorted(packages & HEAVY)
    assert len(list(workdir.glob("outputs/*/*/plan.json"))) == 1


def test_training_without_a_logger_imports_only_torch_of_them(workdir):
    packages = imported_packages(workdir, "trainer.max_steps=1", "trainer.progress_bar=false",
                                 "logger=none")
    assert packages & HEAVY == {"torch"}


def test_training_imports_mlflow_to_open_its_run(workdir):
    packages = imported_packages(workdir, "trainer.max_steps=1", "trainer.progress_bar=false")
    assert {"torch", "mlflow"} <= packages  # mlflow brings pandas and scipy along: its business
    assert not packages & {"torchvision", "submitit", "sklearn", "matplotlib"}
