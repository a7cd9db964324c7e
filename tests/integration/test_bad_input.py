"""Bad input: one line naming key, value and fix; exit 2; no traceback; nothing left behind."""

from __future__ import annotations

import random

import pytest
import torch

from stepwise.loop.trainer import Trainer
from stepwise.run.job import Job
from stepwise.run.runner import execute
from tests.conftest import prepare_job, run_cli

pytestmark = pytest.mark.cli

CASES = [
    (["accum=0"], "accum=0: must be a positive integer"),
    (["accum=-2"], "accum=-2: must be a positive integer"),
    (["data.batch_size=0"], "data.batch_size=0: must be a positive integer"),
    (["effective_batch_size=100"], "fix: use effective_batch_size=96 or 128"),
    (["effective_batch_size=128", "accum=2"], "accum=2: disagrees with effective_batch_size=128"),
    (["trainer.max_steps=0"], "trainer.max_steps=0: must be a positive number"),
    (["trainer.max_epochs=-1"], "trainer.max_epochs=-1: no budget"),
    (["lr_scaling.rule=cubic"], "lr_scaling.rule=cubic: unknown rule; fix: use one of none, linear, sqrt"),
    (["lr_scaling=cubic"], "lr_scaling=cubic: no such lr_scaling option"),
    (["optim.lr=-0.1"], "optim.lr=-0.1: must be positive"),
    (["trainer.max_step=3"], "trainer.max_step=3: no such key; fix: did you mean trainer.max_steps?"),
    (["trainer.partial_window=keep"], "trainer.partial_window=keep: unknown policy"),
    (["accum=abc"], "accum=abc: Value 'abc' of type 'str' could not be converted to Integer"),
    (["data.batch_size=2000", "data.drop_last=true"], "the plan has no optimizer step"),
    (["data.batch_size=1000", "accum=3", "trainer.partial_window=drop"],
     "the plan has no optimizer step"),
    (["trainer.precision=16"], "trainer.precision=16: unknown value; fix: use one of 32, 64, bf16, 16-mixed"),
    (["data.batch_size=auto"], "data.batch_size=auto: needs the effective batch to keep"),
    (["data.batch_size=auto", "effective_batch_size=64", "accum=2"],
     "accum=2: is chosen by data.batch_size=auto"),
    (["data.batch_size=big"], "data.batch_size=big: must be a positive integer or auto"),
    (["trainer.channels_last=true"], "trainer.channels_last=true: data=digits gives vectors"),
    (["schedule=step"], "schedule=step: no such schedule option"),
    (["schedule.name=step"], "schedule.name=step: unknown schedule"),
    (["lr_scaling.base_batch_size=0"], "lr_scaling.base_batch_size=0: must be positive"),
    (["schedule.warmup=20"], "schedule.warmup=20.0: warmup of 28760 samples is longer than the "
                             "whole run (14380 samples)"),
    (["schedule=multistep", "schedule.milestones=[5,12]"],
     "schedule.milestones=[5.0, 12.0]: a milestone lies beyond the end of the run"),
    (["lr_scaling=sqrt", "lr_scaling.adapt_betas=true"],
     "lr_scaling.adapt_betas=true: optim SGDConfig has no betas to adapt"),
    (["optim=adamw", "lr_scaling=linear", "lr_scaling.adapt_betas=true"],
     "lr_scaling.adapt_betas=true: belongs to the sqrt rule, not linear"),
    (["trainer.max_samples=0"], "trainer.max_samples=0: must be a positive number of samples"),
    (["trainer.device=cuda"] if not torch.cuda.is_available() else ["trainer.device=tpu"],
     "trainer.device="),
    # Ranges torch does not check (or checks only inside training): refused before any work.
    (["optim.momentum=2"], "optim.momentum=2.0: must be in [0, 1): the momentum buffer"),
    (["optim.dampening=1.5"], "optim.dampening=1.5: must be in [0, 1]"),
    (["optim=sgd", "optim.nesterov=true", "optim.momentum=0"],
     "optim.nesterov=true: needs optim.momentum > 0 and optim.dampening=0 (here momentum=0, "
     "dampening=0)"),
    (["optim=adamw", "optim.betas=[0.9,1.0]"], "optim.betas=[0.9, 1.0]: must be two values in [0, 1)"),
    (["model.hidden_sizes=[0]"], "model.hidden_sizes=[0]: every layer needs at least 1 unit"),
    (["seed=-1"], "seed=-1: must be >= 0 (numpy takes no negative seeds)"),
    # A key of another option of the group: say whose it is, never "did you mean <the same key>".
    (["parallel.timeout_s=0"], "parallel.timeout_s=0: no such key for parallel=single (it is a key "
                               "of parallel=ddp|fsdp); fix: add one of parallel=ddp|fsdp"),
    (["optim.betas=[0.9,0.99]"], "optim.betas=[0.9,0.99]: no such key for optim=sgd (it is a key of "
                                 "optim=adamw); fix: add optim=adamw"),
    (["model.widths=[8]"], "model.widths=[8]: no such key for model=mlp (it is a key of model=cnn); "
                           "fix: add model=cnn"),
    # Hydra applies a launcher to -m only: without it, the job would train here.
    (["hydra/launcher=slurm", "accum=2"], "hydra/launcher=slurm: a launcher runs multirun jobs only; "
                                          "fix: add -m (python train.py -m hydra/launcher=slurm "
                                          "accum=2)"),
]


@pytest.mark.smoke
@pytest.mark.parametrize("args,expected", CASES, ids=[" ".join(a) for a, _ in CASES])
def test_bad_input_is_one_clear_line(args, expected, workdir):
    proc = run_cli(*args, cwd=workdir)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert expected in lines[0] and "fix:" in lines[0]
    assert "Traceback" not in proc.stdout + proc.stderr
    assert not (workdir / "mlflow.db").exists()  # no run was opened, let alone left RUNNING
    assert not (workdir / "outputs").exists()  # no run directory, nor an empty outputs/<date>/


@pytest.mark.parametrize("kind,content", [
    ("a text file", b"step 1 loss 2.30\nstep 2 loss 2.21\n"),
    ("a binary file", random.Random(0).randbytes(4096)),
])
def test_resuming_from_a_file_that_is_no_checkpoint_is_one_clear_line(kind, content, workdir):
    (workdir / "notes").write_bytes(content)
    proc = run_cli("trainer.resume=notes", cwd=workdir)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"error: trainer.resume=notes: {kind}, not a torch checkpoint file (torch.save output); "
        "fix: give a checkpoint stepwise wrote (<run dir>/checkpoints/last.pt), a run directory, "
        "or trainer.resume=auto|none"]
    assert not (workdir / "mlflow.db").exists()
    assert not (workdir / "outputs").exists()


def test_a_crash_marks_the_run_failed(tmp_path, monkeypatch):
    job: Job = prepare_job(tmp_path, "trainer.max_epochs=1", "trainer.progress_bar=false",
                           "trainer.log_every_n_steps=1",
                           f"logger.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}")
    (job.run_dir / "config.yaml").write_text("{}\n")
    (job.run_dir / "plan.json").write_text(job.plan.to_json())
    real_step = Trainer.train_step

    def failing_step(self, batches, window):
        if self.counters.global_step == 3:
            raise RuntimeError("injected failure at step 3")
        return real_step(self, batches, window)

    monkeypatch.setattr(Trainer, "train_step", failing_step)
    with pytest.raises(RuntimeError, match="injected"):
        execute(job)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    [run] = client.search_runs([client.get_experiment_by_name("stepwise").experiment_id])
    assert run.info.status == "FAILED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == [1, 2, 3]
    assert not (job.run_dir / "checkpoints").exists()  # no final checkpoint for a failed run
