"""A user's own model, data, loss and metrics (tests/fixtures/userpkg, on Hydra's search path):
trained through the CLI (single and DDP), exact per loss item, and refused in one line when a
component does not fit the next."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from torch.nn import functional as F

from stepwise.contract.sampler import epoch_permutation
from stepwise.parallel.replica import Replica
from stepwise.run.build import build_trainer
from stepwise.run.checkpoint import load_checkpoint
from stepwise.run.fit import train
from stepwise.tracking.tracker import NullTracker
from tests.conftest import ROOT, prepare_job, run_cli

FIXTURES = ROOT / "tests" / "fixtures"
SEARCHPATH = "hydra.searchpath=[pkg://userpkg.conf]"
ENV = {"PYTHONPATH": os.pathsep.join([str(FIXTURES), str(ROOT)])}
sys.path.insert(0, str(FIXTURES))  # `userpkg` as the configs name it, for the in-process tests
# Per-token targets, padded with ignore_index: 37 sequences of 1 to 12 tokens.
TAGS = (SEARCHPATH, "model=tagger", "data=tags", "loss=cross_entropy", "metrics=none",
        "logger=none", "trainer.precision=64", "trainer.progress_bar=false", "optim.lr=0.5",
        "optim.momentum=0.0", "trainer.max_epochs=2")


def _run(workdir: Path):
    client = MlflowClient(tracking_uri=f"sqlite:///{workdir / 'mlflow.db'}")
    [run] = client.search_runs([client.get_experiment_by_name("stepwise").experiment_id])
    return run


@pytest.mark.cli
@pytest.mark.parametrize("parallel", ["single", "ddp"])
def test_a_user_project_trains_from_its_own_config_groups(parallel, workdir):
    args = [SEARCHPATH, "experiment=seqs", f"parallel={parallel}", "accum=2",
            "trainer.max_epochs=2"]
    proc = run_cli(*args, cwd=workdir, env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = _run(workdir)
    world = 2 if parallel == "ddp" else 1
    assert run.info.status == "FINISHED"
    assert run.data.params["world_size"] == str(world)
    assert run.data.params["effective_batch_size"] == str(16 * 2 * world)
    assert run.data.params["model._target_"] == "userpkg.models.BagOfTokens"
    assert run.data.params["loss._target_"] == "userpkg.losses.Focal"
    assert int(run.data.metrics["global_step"]) == int(run.data.params["total_optimizer_steps"])
    for name in ("val/loss", "val/accuracy", "val/f1", "test/loss", "test/accuracy", "test/f1"):
        assert 0 <= run.data.metrics[name] <= 1, name
    assert run.data.metrics["val/accuracy"] > 0.5  # 50 validation sequences, two classes
    assert run.data.params["test_samples"] == "41"  # data.test (41: uneven shards in DDP)
    steps = run.data.params["total_optimizer_steps"]
    assert run.data.tags["stepwise.tested"] == f"final at global_step {steps}"


def test_a_user_test_dataset_is_tested_exactly_after_fitting(tmp_path):
    """data.test by _target_: its 41 sequences, in batches of 16 padded each to its longest,
    give the loss and the torchmetrics of the final weights over all of them at once."""
    from userpkg.data import Sequences, pad_collate

    job = prepare_job(tmp_path, SEARCHPATH, "experiment=seqs", "loss=cross_entropy", "logger=none",
                      "trainer.precision=64", "trainer.max_epochs=1")
    assert (job.data.test_samples, job.plan.test_samples) == (41, 41)
    metrics = train(job, Replica("single", 0, 1, torch.device("cpu")), NullTracker())
    # imported after the run's metrics imported torchvision the way a CPU-only torch needs
    from torchmetrics.functional.classification import multiclass_accuracy, multiclass_f1_score
    model = build_trainer(job, Replica("single", 0, 1, torch.device("cpu")), NullTracker()).model
    model.load_state_dict(load_checkpoint(job.run_dir / "checkpoints" / "last.pt")["model"])
    test = Sequences(size=41, seed=2)
    batch = pad_collate([test[i] for i in range(41)])
    with torch.no_grad():
        out = model(tokens=batch["tokens"], mask=batch["mask"])
    assert metrics["test/loss"] == pytest.approx(F.cross_entropy(out, batch["target"]).item(),
                                                 abs=1e-12)
    assert metrics["test/accuracy"] == pytest.approx(
        multiclass_accuracy(out, batch["target"], 2, average="micro").item(), abs=1e-12)
    assert metrics["test/f1"] == pytest.approx(
        multiclass_f1_score(out, batch["target"], 2, average="macro").item(), abs=1e-12)
    assert list(metrics)[-4:] == ["test/loss", "test/accuracy", "test/f1", "global_step"]


def _tags_weights(tmp_path: Path, b: int, k: int) -> dict[str, torch.Tensor]:
    job = prepare_job(tmp_path / f"b{b}k{k}", *TAGS, f"data.batch_size={b}", f"accum={k}")
    assert (job.plan.effective_batch_size, job.plan.last_window_samples) == (8, 5)  # 37 = 4x8+5
    train(job, Replica("single", 0, 1, torch.device("cpu")), NullTracker())
    return load_checkpoint(job.run_dir / "checkpoints" / "last.pt")["model"]


def test_factorings_end_with_the_same_weights_per_token(tmp_path):
    """(b, k) = (8, 1), (4, 2), (2, 4): micro-batches hold different numbers of real tokens, and
    the last window is partial; the mean over the window's tokens makes them train alike."""
    reference = _tags_weights(tmp_path, 8, 1)
    for b, k in [(4, 2), (2, 4)]:
        weights = _tags_weights(tmp_path, b, k)
        for name, value in reference.items():
            assert (weights[name] - value).abs().max().item() < 1e-12, (b, k, name)


def test_each_dataset_is_built_once_per_process(tmp_path):
    """prepare reads its size, the probe a batch, the loaders all of it: one instance each."""
    from userpkg.data import Sequences

    before = Sequences.built
    job = prepare_job(tmp_path, *TAGS, "data.train.size=41", "data.val.size=23")
    train(job, Replica("single", 0, 1, torch.device("cpu")), NullTracker())
    assert Sequences.built - before == 2  # train and val


def test_each_step_is_the_mean_over_the_window_tokens_and_the_naive_mean_differs(tmp_path):
    job = prepare_job(tmp_path, *TAGS, "data.batch_size=2", "accum=4")
    trainer = build_trainer(job, Replica("single", 0, 1, torch.device("cpu")), NullTracker())
    model, lr, dataset = trainer.model, job.plan.lr, job.data.train_set()
    collate = job.data.collate(torch.float64)
    order = epoch_permutation(job.plan.train_samples, job.config.seed, 0).tolist()
    naive_differs = []
    for s, (window, batches) in enumerate(trainer.windows(0)):
        inputs, target = collate([dataset[i] for i in order[s * 8: s * 8 + window.samples]])
        before = [p.detach().clone() for p in model.parameters()]
        loss = F.cross_entropy(model(**inputs), target)  # the mean over the window's tokens
        grads = torch.autograd.grad(loss, list(model.parameters()))
        naive = sum(F.cross_entropy(model(**i), t) for i, t, _ in batches) / len(batches)
        naive_grads = torch.autograd.grad(naive, list(model.parameters()))
        trainer.train_step(batches, window)
        for p, p0, g in zip(model.parameters(), before, grads):
            assert (p.detach() - (p0 - lr * g)).abs().max().item() < 1e-12, s
        naive_differs.append(max((g - n).abs().max().item() for g, n in zip(grads, naive_grads)))
    assert len(naive_differs) == 5 and min(naive_differs) > 1e-4  # the test can tell them apart


@pytest.mark.cli
@pytest.mark.ddp
def test_ddp_matches_one_process_per_token(workdir):
    """W=2 with uneven shards (a rank with fewer or no real sequences in the last window) ends
    where one process with the same effective batch ends."""
    weights = {}
    for name, args in (("single", ["data.batch_size=4", "accum=2"]),
                       ("ddp", ["parallel=ddp", "data.batch_size=2", "accum=2"]),
                       # the items stated per sample: each window's count with no all-reduce
                       ("ddp_stated", ["parallel=ddp", "data.batch_size=2", "accum=2",
                                       "+data.train.state_counts=true"])):
        run_dir = workdir / name
        proc = run_cli(*TAGS, *args, f"hydra.run.dir={run_dir}", cwd=workdir, env=ENV)
        assert proc.returncode == 0, proc.stderr[-3000:]
        weights[name] = load_checkpoint(run_dir / "checkpoints" / "last.pt")["model"]
    for key, value in weights["single"].items():
        for name in ("ddp", "ddp_stated"):
            assert (weights[name][key] - value).abs().max().item() < 1e-12, (name, key)


@pytest.mark.cli
@pytest.mark.parametrize("args,expected", [
    (["model._target_=userpkg.models.BagOfToken"],
     "model._target_=userpkg.models.BagOfToken: userpkg.models has no BagOfToken; "
     "fix: did you mean userpkg.models.BagOfTokens?"),
    (["loss._target_=userpkg.lossess.Focal"],
     "loss._target_=userpkg.lossess.Focal: userpkg has no lossess; fix: did you mean userpkg.losses?"),
    (["+model.dimm=3"], "model.dimm=3: userpkg.models.BagOfTokens takes no such argument, and it "
     "would be ignored; fix: did you mean model.dim?"),
    (["+data.batchsize=3"], "data.batchsize=3: a data group without a stepwise schema is read as "
     "data=dataset, which has no such key; fix: did you mean data.batch_size?"),
    (["model=tagger"], "loss=userpkg.losses.Focal: cannot take the model's output [2, 2, 12] "),
    (["loss._target_=userpkg.losses.batch_mean", "~loss.gamma"],
     "loss._target_=userpkg.losses.batch_mean: returned shape [] for a batch of 2 samples"),
    (["data.train._target_=userpkg.data.Empty"],
     "data.train=userpkg.data.Empty: the training dataset is empty (len 0)"),
    (["model._target_=userpkg.models.NoKwargs", "~model.vocab_size", "~model.dim"],
     "model=userpkg.models.NoKwargs: cannot take a batch of data=Sequences, {tokens: [2, 12] "
     "int64, mask: [2, 12] bool} (NoKwargs.forward() got an unexpected keyword argument"),
    (["+metrics.bad={_target_: userpkg.losses.Focal}"],
     "metrics.bad._target_=userpkg.losses.Focal: built a Focal, not a torchmetrics.Metric"),
    (["data.collate_fn=null"], "data=Sequences: cannot make a batch of 2 training samples"),
])
def test_a_component_that_does_not_fit_is_one_line(args, expected, workdir):
    proc = run_cli(SEARCHPATH, "experiment=seqs", *args, cwd=workdir, env=ENV)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.startswith("error: " + expected), proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert not (workdir / "mlflow.db").exists() and not (workdir / "outputs").exists()


# Each mistake a user can make in a component's config, at any depth: Hydra's refusal of a key
# (judged by the option the experiment chose and its _target_'s signature), a required argument
# not set, a constructor that raises, a _target_ that is no class or function, a search path or
# YAML file that is wrong.
MISTAKES = [
    (["model.dimm=32"], "model.dimm=32: userpkg.models.GRUClassifier takes no such argument; "
     "fix: did you mean model.dim?"),
    (["data.train.sizee=3"], "data.train.sizee=3: userpkg.data.Sequences takes no such argument; "
     "fix: did you mean data.train.size?"),
    (["data.train.min_len=3"], "data.train.min_len=3: userpkg.data.Sequences takes min_len, but "
     "the config does not set it, so Hydra has no such key to override; fix: "
     "+data.train.min_len=3 adds it"),
    (["loss.gammma=2"], "loss.gammma=2: userpkg.losses.Focal takes no such argument; fix: did "
     "you mean loss.gamma?"),
    (["metrics.f1.averagee=macro"], "metrics.f1.averagee=macro: no such key in metrics.f1 "
     "(torchmetrics.classification.f_beta.MulticlassF1Score); fix: did you mean "
     "metrics.f1.average? (+metrics.f1.averagee=macro passes a new argument)"),
    (["data.collate_fn.pad_idd=0"], "data.collate_fn.pad_idd=0: userpkg.data.pad_collate takes "
     "no such argument; fix: did you mean data.collate_fn.pad_id?"),
    (["data.num_workers=2"], "data.num_workers=2: data=seqs does not set num_workers, so Hydra "
     "has no such key to override (a data group of yours takes it); fix: +data.num_workers=2"),
    (["data.batch_sizee=2"], "data.batch_sizee=2: no such key for data=seqs; fix: did you mean "
     "data.batch_size?"),
    (["model.hidden_sizes=[8]"], "model.hidden_sizes=[8]: userpkg.models.GRUClassifier takes no "
     "such argument; fix: remove it; userpkg.models.GRUClassifier takes dim, num_outputs, "
     "vocab_size"),
    (["~model.dim"], "model.dim=???: userpkg.models.GRUClassifier needs dim (it has no default), "
     "and the config does not set it; fix: set it in the option's YAML, or add +model.dim=..."),
    (["~data.train.size"], "data.train.size=???: userpkg.data.Sequences needs size"),
    (["data.collate_fn._partial_=false"], "data.collate_fn.samples=???: userpkg.data.pad_collate "
     "needs samples (it has no default), and the config does not set it; fix: add _partial_: "
     "true to data.collate_fn's YAML"),
    (["model.dim=0"], "model=userpkg.models.GRUClassifier(vocab_size=8, dim=0, num_outputs=2): "
     "building it raised ValueError at torch/nn/modules/rnn.py:"),
    (["data.train.size=-3"], "data.train=userpkg.data.Sequences(size=-3, seed=0): building it "
     f"raised RuntimeError at {FIXTURES / 'userpkg' / 'data.py'}:"),
    (["+metrics.f1.averagee=macro"], "metrics.f1=torchmetrics.classification.f_beta."
     "MulticlassF1Score(average='macro', averagee='macro', num_classes=2): building it raised "
     "ValueError at torchmetrics/metric.py:"),
    (["model._target_=userpkg.models"], "model._target_=userpkg.models: userpkg.models is a "
     "module, not a class or function; fix: name one in it (BagOfTokens, GRUClassifier"),
]


@pytest.mark.cli
@pytest.mark.parametrize("args,expected", MISTAKES, ids=[" ".join(a) for a, _ in MISTAKES])
def test_a_mistake_in_a_user_component_is_one_line(args, expected, workdir):
    # not a dry run, which builds none of the user's components: a constructor runs here
    proc = run_cli(SEARCHPATH, "experiment=gru", *args, cwd=workdir, env=ENV)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: " + expected), proc.stderr[-3000:]
    assert "fix: " in lines[0] and "Traceback" not in proc.stdout + proc.stderr
    assert not (workdir / "outputs").exists()


@pytest.mark.cli
def test_mistakes_in_the_config_files_and_the_search_path_are_one_line(workdir):
    (workdir / "conf" / "model").mkdir(parents=True)
    (workdir / "conf" / "model" / "broken.yaml").write_text("_target_: x.Y\ndim: 16\n vocab: [8\n")
    (workdir / "conf" / "model" / "untargeted.yaml").write_text("dim: 16\nvocab_size: 8\n")
    both = f"hydra.searchpath=[file://{workdir / 'conf'},pkg://userpkg.conf]"
    for args, expected in [
        ([both, "model=broken"], f"{workdir / 'conf' / 'model' / 'broken.yaml'}:3:7: not valid "
         "YAML (mapping values are not allowed here); fix: correct the file"),
        ([both, "model=untargeted"], "model._target_=null: a component needs the dotted import "
         "path of its class or function; fix: write e.g. _target_: mypkg.models.Net"),
        (["hydra.searchpath=[pkg://userpkgs.conf]"], "hydra.searchpath=pkg://userpkgs.conf: no "
         "package userpkgs.conf is importable, so its config groups are not found; fix: install "
         "your package, or put it on the Python path (PYTHONPATH)"),
        ([f"hydra.searchpath=[file://{workdir / 'confs'}]"], f"hydra.searchpath=file://"
         f"{workdir / 'confs'}: no directory {workdir / 'confs'}, so its config groups are not "
         "found"),
    ]:
        proc = run_cli(*args, "experiment=gru", "dry_run=true", cwd=workdir, env=ENV)
        assert proc.returncode == 2, proc.stderr[-3000:]
        # (after Hydra's own warning, for a search path: "path=... is not available")
        last = proc.stderr.strip().splitlines()[-1]
        assert last.startswith("error: " + expected), proc.stderr[-3000:]
        assert "Traceback" not in proc.stderr
    assert not (workdir / "outputs").exists()


@pytest.mark.cli
def test_hydra_full_error_shows_the_traceback_of_a_component_that_raised(workdir):
    proc = run_cli(SEARCHPATH, "experiment=gru", "model.dim=0", cwd=workdir,
                   env={**ENV, "HYDRA_FULL_ERROR": "1"})
    assert proc.returncode == 2
    assert "Traceback" in proc.stderr and "ValueError: input_size must be greater than zero" in \
        proc.stderr and proc.stderr.strip().splitlines()[-1].startswith("error: model=")


def test_an_empty_validation_dataset_gets_a_warning(tmp_path, caplog):
    import logging

    with caplog.at_level(logging.WARNING, logger="stepwise"):
        job = prepare_job(tmp_path, SEARCHPATH, "experiment=seqs", "dry_run=true",
                          "data.val._target_=userpkg.data.Empty")
    assert job.data.val_samples == 0
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING] == [
        "data.val=userpkg.data.Empty: the validation dataset is empty (len 0), so the run never "
        "evaluates (no val/loss, no metrics); fix: check its arguments, or set data.val=null "
        "for a run without validation"]
