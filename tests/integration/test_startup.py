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


def imported_modules(workdir, *overrides: str, env: dict[str, str] | None = None) -> set[str]:
    """The modules that `python train.py <overrides>` imports."""
    out = workdir / "modules.json"
    run_cli(*overrides, cwd=workdir, check=True, python_args=["-c", DRIVER, str(out)], env=env)
    return set(json.loads(out.read_text()))


def imported_packages(workdir, *overrides: str) -> set[str]:
    """The top-level packages that `python train.py <overrides>` imports."""
    return {name.split(".")[0] for name in imported_modules(workdir, *overrides)}


def test_a_dry_run_of_a_user_project_builds_no_component_of_it(workdir):
    """It needs torch (the user's datasets are built, for their sizes), but neither torchmetrics
    (~1.6 s) nor torch._dynamo (~1.3 s, the optimizer and the two-sample probe)."""
    from tests.integration.test_user_project import ENV, SEARCHPATH

    modules = imported_modules(workdir, SEARCHPATH, "experiment=gru", "dry_run=true", env=ENV)
    assert {"torch", "userpkg.data", "userpkg.models"} <= modules
    assert not modules & {"torchmetrics", "torch._dynamo", "mlflow"}, \
        sorted(modules & {"torchmetrics", "torch._dynamo", "mlflow"})
    assert len(list(workdir.glob("outputs/*/*/plan.json"))) == 1


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
