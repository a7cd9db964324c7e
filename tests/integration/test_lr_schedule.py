"""LR curves read back from MLflow: invariant in samples, scaled by the declared rule."""

from __future__ import annotations

import json

import pytest
from mlflow.tracking import MlflowClient

from stepwise.run.checkpoint import load_checkpoint
from tests.conftest import run_cli

pytestmark = pytest.mark.cli

# 1024 training samples: every factoring below has full windows only.
COMMON = ("data=synthetic", "data.train_samples=1024", "data.val_samples=64",
          "trainer.log_every_n_steps=1",
          "trainer.max_epochs=3", "schedule=cosine", "schedule.warmup=1", "lr_scaling=linear",
          "lr_scaling.base_batch_size=64", "optim.lr=0.05", "trainer.progress_bar=false",
          "logger.log_model=false")


def _curves(workdir, names):
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("stepwise")
    curves = {}
    for run in client.search_runs([experiment.experiment_id]):
        if run.info.run_name in names:
            history = {}
            for key in ("train/lr", "train/samples_seen"):
                history[key] = {m.step: m.value for m in
                                client.get_metric_history(run.info.run_id, key)}
            curves[run.info.run_name] = (run, history)
    return curves


def test_lr_curves_are_invariant_in_samples(workdir):
    runs = {"e64_b64_k1": ["data.batch_size=64", "accum=1"],
            "e64_b16_k4": ["data.batch_size=16", "accum=4"],
            "e256_b32_k8": ["data.batch_size=32", "accum=8"]}
    for name, args in runs.items():
        run_cli(*COMMON, *args, f"logger.run_name={name}", f"hydra.run.dir=outputs/{name}",
                cwd=workdir, check=True)  # one dir each: two runs in one second would share one
    curves = _curves(workdir, runs)

    # Same E, different (b, k): identical train/lr per global_step.
    lr_a, lr_b = curves["e64_b64_k1"][1]["train/lr"], curves["e64_b16_k4"][1]["train/lr"]
    assert len(lr_a) == 48 and lr_a == lr_b

    # E = 64 and E = 256 under `linear`: the same curve against samples, times 4.
    def by_samples_before(name, effective):
        _, history = curves[name]
        seen = history["train/samples_seen"]
        return {int(seen[step]) - effective: lr for step, lr in history["train/lr"].items()}

    small, large = by_samples_before("e64_b64_k1", 64), by_samples_before("e256_b32_k8", 256)
    assert len(large) == 12 and set(large) <= set(small)
    for samples, lr in large.items():
        assert lr == pytest.approx(4 * small[samples], rel=1e-12), samples
    # Warmup (1 epoch = 1024 samples) ends at the same sample in both runs.
    for curve, peak in ((small, 0.05), (large, 0.2)):
        assert curve[1024] == pytest.approx(peak) and curve[1024 - 256] < peak
        assert max(curve.values()) == pytest.approx(peak)
    run, _ = curves["e256_b32_k8"]
    assert (run.data.params["lr"], run.data.params["lr_scale_factor"]) == ("0.2", "4.0")
    assert (run.data.params["warmup_steps"], run.data.params["schedule.name"]) == ("4", "cosine")


def test_adapt_betas_is_logged(workdir):
    run_cli("optim=adamw", "lr_scaling=sqrt", "lr_scaling.adapt_betas=true",
            "lr_scaling.base_batch_size=32", "accum=4", "trainer.max_epochs=1",
            "logger.run_name=adam", "hydra.run.dir=outputs/adam", cwd=workdir, check=True)
    [(run, _)] = _curves(workdir, {"adam"}).values()
    assert run.data.params["lr"] == "0.002" and run.data.params["lr_scale_factor"] == "2.0"
    assert json.loads(run.data.params["betas_used"]) == pytest.approx([0.6, 0.996])
    assert float(run.data.params["eps_used"]) == pytest.approx(5e-9)
    # ...and what the optimizer really used (kappa = 128 / 32 = 4)
    group = load_checkpoint(workdir / "outputs/adam/checkpoints/last.pt")["optimizer"][
        "param_groups"][0]
    assert group["betas"] == pytest.approx((0.6, 0.996)) and group["eps"] == pytest.approx(5e-9)
    assert group["lr"] == pytest.approx(0.002)
