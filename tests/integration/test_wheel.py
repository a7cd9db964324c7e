"""stepwise as a user gets it: the wheel, installed with its dependencies into a fresh venv, run
from an empty directory outside the checkout; the built-in job, then a user's own project
(examples/parity: its own data, model, loss, metric and config groups, found by pkg://).

The wheel and the venv are built once for the module (installing torch takes a minute or two).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

pytestmark = [pytest.mark.slow, pytest.mark.cli]

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "parity"
EXAMPLE_ARGS = ("hydra.searchpath=[pkg://parity.conf]", "experiment=parity")


def _env(venv: Path) -> dict[str, str]:
    """The caller's environment as a user's shell with the venv activated: nothing that would
    make the checkout importable (PYTHONPATH) or move the tracking store (MLFLOW_*)."""
    env = {k: v for k, v in os.environ.items()
           if k != "PYTHONPATH" and not k.startswith(("MLFLOW_", "HYDRA_"))}
    env["VIRTUAL_ENV"] = str(venv)
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    return env  # ONEDNN_MAX_CPU_ISA, if set (an AMX cap), is kept


def _run(command: list[str], cwd: Path, env: dict[str, str] | None = None,
         timeout: float = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(command)} (in {cwd}) exited {proc.returncode}\n"
                             f"{proc.stdout[-5000:]}\n{proc.stderr[-5000:]}")
    return proc


def _copy_sources(src: Path, dst: Path) -> Path:
    """The working tree's files (tracked and new, not ignored) in `dst`: pip builds in the source
    tree, and its build/ and *.egg-info must not land in the checkout."""
    listed = subprocess.run(["git", "-C", str(src), "ls-files", "-z", "-co", "--exclude-standard"],
                            capture_output=True, text=True, check=True).stdout.split("\0")
    for name in filter(None, listed):
        if (src / name).is_file():  # a tracked file deleted in the working tree is not listed twice
            (dst / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src / name, dst / name)
    return dst


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("wheel")
    source = _copy_sources(ROOT, base / "src")
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(base / "dist"),
          str(source)], cwd=base, timeout=600)
    [built] = (base / "dist").glob("stepwise-*.whl")
    return built


@pytest.fixture(scope="module")
def venv(tmp_path_factory, wheel: Path):
    """A fresh venv with the wheel and its dependencies (from pip's configured indexes)."""
    path = tmp_path_factory.mktemp("venv") / "venv"
    _run([sys.executable, "-m", "venv", str(path)], cwd=path.parent)
    _run([str(path / "bin" / "python"), "-m", "pip", "install", "-q", str(wheel)], cwd=path.parent,
         env=_env(path), timeout=900)
    yield path
    shutil.rmtree(path, ignore_errors=True)  # several GB with torch; run dirs are kept


@pytest.fixture(scope="module")
def parity_venv(tmp_path_factory, venv: Path) -> Path:
    """The same venv with the example project installed (from a copy: pip builds in the tree)."""
    source = tmp_path_factory.mktemp("example") / "parity"
    shutil.copytree(EXAMPLE, source, ignore=shutil.ignore_patterns("__pycache__", "build", "*.egg-info"))
    _run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", str(source)], cwd=source.parent,
         env=_env(venv), timeout=600)
    return venv


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    """An empty directory outside the checkout, where a user would start a run."""
    assert ROOT not in tmp_path.parents and not any(tmp_path.iterdir())
    return tmp_path


def _stepwise(venv: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return _run([str(venv / "bin" / "stepwise"), *args], cwd=cwd, env=_env(venv))


def _only_run(workdir: Path):
    assert (workdir / "outputs").is_dir() and (workdir / "mlflow.db").is_file()
    client = MlflowClient(tracking_uri=f"sqlite:///{workdir / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("stepwise")
    [run] = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED"
    return run


def test_the_wheel_carries_the_code_and_the_config(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    # every module of every subpackage, and the checkout's conf/ as the package stepwise.conf
    modules = {p.relative_to(ROOT / "src").as_posix() for p in (ROOT / "src" / "stepwise").rglob("*.py")}
    config = {"stepwise/conf/" + p.relative_to(ROOT / "conf").as_posix()
              for p in [*(ROOT / "conf").rglob("*.yaml"), ROOT / "conf" / "__init__.py"]}
    assert {"stepwise/models/__init__.py", "stepwise/conf/config.yaml",
            "stepwise/conf/model/mlp.yaml", "stepwise/conf/hydra/launcher/slurm.yaml"} <= names
    assert modules <= names and config <= names, sorted((modules | config) - names)
    assert not any(name.startswith(("tests/", "examples/", "src/", "conf/")) for name in names)


def test_stepwise_is_imported_from_the_venv_not_the_checkout(venv, workdir):
    proc = _run([str(venv / "bin" / "python"), "-c", "import importlib.resources, stepwise; "
                 "print(stepwise.__file__); print(importlib.resources.files('stepwise.conf'))"],
                cwd=workdir, env=_env(venv))
    for line in proc.stdout.split():  # the package and its config
        imported = Path(line).resolve()
        assert venv.resolve() in imported.parents and ROOT not in imported.parents, imported


def test_console_script_trains_the_builtin_job(venv, workdir):
    proc = _stepwise(venv, "trainer.max_epochs=1", cwd=workdir)
    run = _only_run(workdir)
    params, metrics = run.data.params, run.data.metrics
    # digits: 1438 training samples in batches of 32 -> 45 optimizer steps
    assert (params["effective_batch_size"], params["world_size"], params["total_optimizer_steps"]) == (
        "32", "1", "45")
    assert metrics["global_step"] == 45 and metrics["val/accuracy"] > 0.5
    assert "effective_batch_size (E=b*k*W)  32" in proc.stdout + proc.stderr


def test_python_m_stepwise_dry_run(venv, workdir):
    proc = _run([str(venv / "bin" / "python"), "-m", "stepwise", "dry_run=true"], cwd=workdir,
                env=_env(venv))
    out = proc.stdout + proc.stderr
    assert "total_optimizer_steps           450" in out and "dry_run=true" in out
    assert (workdir / "outputs").is_dir()


def test_the_example_is_imported_from_the_venv(parity_venv, workdir):
    proc = _run([str(parity_venv / "bin" / "python"), "-c",
                 "import parity.conf, stepwise; print(parity.conf.__file__)"], cwd=workdir,
                env=_env(parity_venv))
    imported = Path(proc.stdout.strip()).resolve()
    assert parity_venv.resolve() in imported.parents and ROOT not in imported.parents, imported


def _check_example_run(workdir: Path, world_size: int, accum: int):
    run = _only_run(workdir)
    params, metrics = run.data.params, run.data.metrics
    assert (params["world_size"], params["accum"], params["per_device_batch_size"]) == (
        str(world_size), str(accum), "32")
    assert params["effective_batch_size"] == str(32 * accum * world_size)
    assert metrics["global_step"] == int(params["total_optimizer_steps"])
    assert metrics["train/samples_seen"] == 2 * 1000  # 2 epochs
    targets = ("model._target_", "loss._target_", "metrics.balanced_accuracy._target_")
    assert [params[key] for key in targets] == [
        "parity.models.BagOfTokens", "parity.losses.FocalLoss", "parity.metrics.BalancedAccuracy"]
    assert metrics["val/loss"] < 0.1  # focal loss; it starts near 0.17 (ln 2 / 4)
    assert metrics["val/accuracy"] > 0.8 and metrics["val/balanced_accuracy"] > 0.8
    assert metrics["test/accuracy"] > 0.8 and metrics["test/balanced_accuracy"] > 0.8  # data.test
    return params, metrics


def test_example_project_single_process(parity_venv, workdir):
    _stepwise(parity_venv, *EXAMPLE_ARGS, cwd=workdir)
    params, _ = _check_example_run(workdir, world_size=1, accum=1)
    # 1000 training sequences in batches of 32: 32 optimizer steps per epoch, 2 epochs
    assert params["total_optimizer_steps"] == "64"


def test_example_project_ddp_with_accumulation(parity_venv, workdir):
    _stepwise(parity_venv, *EXAMPLE_ARGS, "parallel=ddp", "accum=2", cwd=workdir)
    params, _ = _check_example_run(workdir, world_size=2, accum=2)
    # 500 sequences per rank: 16 micro-batches of 32 (the last one 20), 8 windows of 2, 2 epochs
    assert params["total_optimizer_steps"] == "16"


# The test package (tests/fixtures/userpkg) as a user would ship it: its config groups declared as
# package data, installed (not editable) beside the wheel. Its GRU model cannot be exported.
USERPKG_PYPROJECT = """\
[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "userpkg"
version = "0.1.0"
dependencies = ["stepwise", "torch", "torchmetrics"]

[tool.setuptools]
packages = ["userpkg", "userpkg.conf"]

[tool.setuptools.package-data]
"userpkg.conf" = ["*/*.yaml"]
"""
USERPKG_ARGS = ("hydra.searchpath=[pkg://userpkg.conf]", "experiment=gru")


@pytest.fixture(scope="module")
def user_venv(tmp_path_factory, parity_venv: Path) -> Path:
    source = tmp_path_factory.mktemp("userpkg") / "project"
    shutil.copytree(ROOT / "tests" / "fixtures" / "userpkg", source / "userpkg",
                    ignore=shutil.ignore_patterns("__pycache__"))
    (source / "pyproject.toml").write_text(USERPKG_PYPROJECT)
    _run([str(parity_venv / "bin" / "python"), "-m", "pip", "install", "-q", "--no-deps",
          str(source)], cwd=source.parent, env=_env(parity_venv), timeout=600)
    return parity_venv


LOAD_BACK = """
import json, sys, torch, mlflow.pytorch
from userpkg.data import Sequences, pad_collate
run_id, checkpoint = sys.argv[1:]
mlflow.set_tracking_uri("sqlite:///mlflow.db")
logged = mlflow.pytorch.load_model(f"runs:/{run_id}/model")
weights = torch.load(checkpoint, weights_only=False)["model"]
batch = pad_collate([Sequences(5, seed=3)[i] for i in range(5)])
print(json.dumps({"class": type(logged).__qualname__,
                  "equal": all(torch.equal(v, weights[k]) for k, v in logged.state_dict().items()),
                  "outputs": logged.eval()(tokens=batch["tokens"], mask=batch["mask"]).shape[0]}))
"""


def test_a_model_torch_export_rejects_reaches_mlflow_from_an_installed_user_package(user_venv,
                                                                                    workdir):
    # with a callback of the package's own config group beside a built-in one
    proc = _stepwise(user_venv, *USERPKG_ARGS, "trainer.max_steps=4", "hydra.run.dir=outputs/gru",
                     "callbacks=[weight_norm,lr_monitor]", cwd=workdir)
    run = _only_run(workdir)
    assert run.data.params["model._target_"] == "userpkg.models.GRUClassifier"
    assert run.data.params["callbacks.weight_norm._target_"] == "userpkg.callbacks.WeightNorm"
    client = MlflowClient(tracking_uri=f"sqlite:///{workdir / 'mlflow.db'}")
    norms = client.get_metric_history(run.info.run_id, "weights/norm")
    assert [m.step for m in norms] == [1, 2, 3, 4]
    final = torch.load(workdir / "outputs" / "gru" / "checkpoints" / "last.pt")["model"]
    by_hand = torch.linalg.vector_norm(torch.cat([v.flatten().double() for k, v in final.items()]))
    assert abs(norms[-1].value - by_hand.item()) < 1e-9
    out = proc.stdout + proc.stderr
    assert "final model logged to MLflow as a pickled module (torch.export cannot trace it" in out
    loaded = _run([str(user_venv / "bin" / "python"), "-c", LOAD_BACK, run.info.run_id,
                   str(workdir / "outputs" / "gru" / "checkpoints" / "last.pt")], cwd=workdir,
                  env=_env(user_venv))
    import json

    assert json.loads(loaded.stdout.strip().splitlines()[-1]) == {
        "class": "GRUClassifier", "equal": True, "outputs": 5}


def test_a_mistake_in_an_installed_user_package_s_config_is_one_line(user_venv, workdir):
    proc = subprocess.run([str(user_venv / "bin" / "stepwise"), *USERPKG_ARGS, "model.dimm=32"],
                          cwd=workdir, env=_env(user_venv), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "error: model.dimm=32: userpkg.models.GRUClassifier takes no such argument; fix: did you "
        "mean model.dim?"], proc.stderr
    assert not (workdir / "outputs").exists()


def test_stepwise_verify_runs_a_user_package_s_model_from_the_wheel(user_venv, workdir):
    """The GRU over packed real tokens: invariant (each step within float64 rounding, DDP too)."""
    import json

    proc = _stepwise(user_venv, "verify", *USERPKG_ARGS, "hydra.run.dir=outputs/verify",
                     cwd=workdir)
    report = json.loads((workdir / "outputs" / "verify" / "verify.json").read_text())
    assert report["verdict"] == "invariant", proc.stdout[-3000:]
    assert report["factorings"] == ["16 x 1 x 1", "8 x 2 x 1", "4 x 2 x 2 (ddp)"]
    assert all(d["max_rel"] < 1e-13 for steps in report["differences"].values() for d in steps)
    assert "verdict: invariant" in proc.stdout
