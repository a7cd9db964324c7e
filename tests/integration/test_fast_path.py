"""Issue 8 on CPU: precision modes (bf16 autocast, the fp16 GradScaler), `data.batch_size=auto`
with an injected out-of-memory, and `trainer.log_every_n_steps` changing only what is logged."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from stepwise.parallel.replica import Replica
from stepwise.run.build import build_trainer
from stepwise.run.checkpoint import load_checkpoint
from stepwise.tracking.tracker import NullTracker
from tests.conftest import ROOT, prepare_job, run_cli

CPU = Replica("single", 0, 1, torch.device("cpu"))
SMALL = ("logger=none", "trainer.progress_bar=false", "model.hidden_sizes=[32]",
         "optim.momentum=0.9", "optim.lr=0.05", "data.batch_size=16", "accum=4")


def _steps(tmp_path: Path, precision: str, steps: int, *extra: str):
    job = prepare_job(tmp_path / precision, *SMALL, f"trainer.precision={precision}",
                      f"trainer.max_steps={steps}", *extra)
    trainer = build_trainer(job, CPU, NullTracker())
    initial = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    return trainer, initial


def test_bf16_autocasts_the_forward_and_keeps_float32_weights(tmp_path):
    results = {}
    for precision in ("32", "bf16"):
        trainer, _ = _steps(tmp_path, precision, 20)
        seen = []
        trainer.model[0].register_forward_hook(lambda m, i, out, seen=seen: seen.append(out.dtype))
        metrics = trainer.fit()
        assert seen and set(seen) == {torch.bfloat16 if precision == "bf16" else torch.float32}
        assert all(p.dtype == torch.float32 for p in trainer.model.parameters())
        results[precision] = (trainer.model.state_dict(), metrics)
    (w32, m32), (w16, m16) = results["32"], results["bf16"]
    gaps = [(w16[k] - w32[k]).abs().max().item() for k in w32]
    # bfloat16 rounding (8-bit mantissa) moves the weights, but only by rounding-sized amounts.
    assert 1e-5 < max(gaps) < 0.05, gaps
    assert abs(m16["val/loss"] - m32["val/loss"]) < 0.05


def test_16_mixed_unscales_the_accumulated_gradient_once(tmp_path):
    """One SGD step (no momentum) under 16-mixed moves the weights by lr x the float32 gradient,
    not by lr x scale x gradient, nor by a gradient unscaled once per micro-step."""
    moves = {}
    for precision in ("32", "16-mixed"):
        trainer, initial = _steps(tmp_path, precision, 1, "optim.momentum=0")
        trainer.fit()
        moves[precision] = {k: trainer.model.state_dict()[k] - initial[k] for k in initial}
    for key, move in moves["32"].items():
        assert move.abs().max() > 1e-4
        assert (moves["16-mixed"][key] - move).abs().max() < 0.02 * move.abs().max(), key


def test_16_mixed_counts_the_steps_the_scaler_skips(tmp_path):
    trainer, initial = _steps(tmp_path, "16-mixed", 3, "trainer.log_every_n_steps=1")
    # A scale far above float16's range: every gradient overflows, until the scale is cut enough.
    trainer.precision.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 40)
    trainer.fit()
    assert trainer.counters.skipped_steps == 3 and trainer.counters.global_step == 3
    assert trainer.precision.scaler.get_scale() == 2.0 ** 37  # cut in half once per skip
    for key, value in trainer.model.state_dict().items():
        assert torch.equal(value, initial[key]), key  # no step was applied
    state = trainer.state_dict()
    assert state["precision"]["scaler"]["scale"] == 2.0 ** 37


def test_16_mixed_scaler_state_survives_a_resume(workdir):
    args = ("trainer.max_epochs=2", "trainer.precision=16-mixed", "model.hidden_sizes=[32]",
            "trainer.checkpoint_every_n_steps=20", "hydra.run.dir=outputs/r", "logger=none")
    run_cli(*args, "trainer.max_steps=20", cwd=workdir, check=True)
    first = load_checkpoint(workdir / "outputs/r/checkpoints/last.pt")
    assert first["precision"]["scaler"]["scale"] > 0
    run_cli(*args, cwd=workdir, check=True)  # max_steps back to the full plan: continues
    resumed = load_checkpoint(workdir / "outputs/r/checkpoints/last.pt")
    assert resumed["global_step"] == 90 and "scaler" in resumed["precision"]


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(run_dir / "checkpoints" / "last.pt")["model"]


EXACT = ("trainer.precision=64", "model.hidden_sizes=[32]", "optim.momentum=0.9",
         "optim.lr=0.05", "trainer.max_epochs=2", "trainer.progress_bar=false",
         "logger.log_model=false")


def test_auto_batch_size_halves_on_out_of_memory_and_trains_the_same(workdir):
    proc = run_cli(*EXACT, "data.batch_size=auto", "effective_batch_size=64",
                   "model._target_=tests.fixtures.MemoryCappedMLP", "hydra.run.dir=outputs/auto",
                   cwd=workdir, env={"OOM_ABOVE": "16", "PYTHONPATH": str(ROOT)}, check=True)
    assert "out of memory at 64, 32; per-device batch 16, accum 4" in proc.stdout
    plan = json.loads((workdir / "outputs/auto/plan.json").read_text())
    assert (plan["per_device_batch_size"], plan["accum"], plan["effective_batch_size"]) == (16, 4, 64)
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    [run] = client.search_runs([client.get_experiment_by_name("stepwise").experiment_id])
    params = run.data.params
    assert (params["per_device_batch_size"], params["accum"]) == ("16", "4")
    assert params["data.batch_size"] == "auto" and params["auto_batch_sizes_tried"] == "[64, 32, 16]"
    assert run.data.metrics["global_step"] == 46 and run.info.status == "FINISHED"
    # The same training as one step of 64 (the capped model is the plain MLP, same init).
    run_cli(*EXACT, "data.batch_size=64", "logger=none", "hydra.run.dir=outputs/b64",
            cwd=workdir, check=True)
    auto, b64 = _weights(workdir / "outputs/auto"), _weights(workdir / "outputs/b64")
    assert max((auto[k] - b64[k]).abs().max().item() for k in b64) < 1e-9


@pytest.mark.ddp
def test_auto_batch_size_ranks_agree_on_the_smallest(workdir):
    """torchrun, 2 ranks; rank 1 runs out of memory above 8 samples, rank 0 above 32."""
    torchrun = Path(sys.executable).with_name("torchrun")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "HYDRA_"))}
    env.update(OOM_ABOVE_RANK0="32", OOM_ABOVE_RANK1="8", PYTHONPATH=str(ROOT))
    proc = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node=2", str(ROOT / "train.py"),
                           "parallel=ddp", *EXACT, "data.batch_size=auto",
                           "effective_batch_size=64", "logger=none", "hydra.run.dir=outputs/ddp",
                           "model._target_=tests.fixtures.MemoryCappedMLP"],
                          cwd=workdir, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    plan = json.loads((workdir / "outputs/ddp/plan.json").read_text())
    assert (plan["per_device_batch_size"], plan["accum"], plan["world_size"]) == (8, 4, 2)
    run_cli(*EXACT, "data.batch_size=64", "logger=none", "hydra.run.dir=outputs/b64",
            cwd=workdir, check=True)
    ddp, b64 = _weights(workdir / "outputs/ddp"), _weights(workdir / "outputs/b64")
    assert max((ddp[k] - b64[k]).abs().max().item() for k in b64) < 1e-9


def test_log_every_n_steps_changes_what_is_logged_not_what_is_computed(workdir):
    histories, weights = {}, {}
    for every in (1, 7):
        run_dir = f"outputs/every{every}"
        run_cli(*EXACT, f"trainer.log_every_n_steps={every}", f"logger.run_name=every{every}",
                f"hydra.run.dir={run_dir}", cwd=workdir, check=True)
        weights[every] = _weights(workdir / run_dir)
        client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
        [run] = client.search_runs([client.get_experiment_by_name("stepwise").experiment_id],
                                   filter_string=f"attributes.run_name = 'every{every}'")
        histories[every] = {m.step: m.value
                            for m in client.get_metric_history(run.info.run_id, "train/loss")}
    assert sorted(histories[1]) == list(range(1, 91))  # 2 epochs of 45 steps
    assert sorted(histories[7]) == [*range(7, 90, 7), 90]  # and the last step
    for step, value in histories[7].items():
        assert value == histories[1][step], step
    for key, value in weights[1].items():
        assert torch.equal(value, weights[7][key]), key
