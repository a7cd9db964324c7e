"""Image data and models through config: ImageFolder, MNIST and CIFAR-10 files written by the tests
(nothing is downloaded), FakeData, the small CNN and torchvision's model zoo."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from mlflow.tracking import MlflowClient
from PIL import Image

from stepwise.contract.errors import ConfigError
from stepwise.data.loaders import make_loaders
from stepwise.parallel.replica import Replica
from stepwise.run.checkpoint import load_checkpoint
from tests.conftest import prepare_job, run_cli

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}


def write_imagefolder(root: Path, per_class: int = 12, size: int = 20) -> Path:
    """<root>/<colour>/<i>.png: noisy images of three colours, a learnable 3-class problem."""
    rng = np.random.default_rng(0)
    for name, rgb in COLOURS.items():
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = np.clip(np.array(rgb) + rng.normal(0, 25, (size, size, 3)), 0, 255)
            Image.fromarray(pixels.astype(np.uint8)).save(root / name / f"{i}.png")
    return root


def write_mnist(root: Path, train: int = 40, test: int = 12) -> Path:
    """MNIST's raw idx files (the format torchvision reads) with random digits."""
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", train), ("t10k", test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, n, dtype=np.uint8)
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(
            struct.pack(">IIII", 2051, n, 28, 28) + images.tobytes())
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(struct.pack(">II", 2049, n)
                                                          + labels.tobytes())
    return root


def _run(workdir: Path):
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    [run] = client.search_runs([client.get_experiment_by_name("stepwise").experiment_id])
    return run


@pytest.mark.cli
def test_imagefolder_trains_one_epoch_through_the_cli(workdir):
    root = write_imagefolder(workdir / "colours")
    proc = run_cli("data=imagefolder", f"data.root={root}", "model=cnn", "data.batch_size=8",
                   "accum=2", "trainer.max_epochs=1", "trainer.progress_bar=false",
                   "data.num_workers=2", "data.persistent_workers=true", cwd=workdir, check=True)
    run = _run(workdir)
    # 36 images, round(0.2 x 36) = 7 held out (4 validation, 3 test): 29 train = 3 windows of
    # 16, the last of 13
    assert run.data.params["train_samples"] == "29", proc.stdout
    assert (run.data.params["val_samples"], run.data.params["test_samples"]) == ("4", "3")
    assert run.data.metrics["global_step"] == 2 and run.info.status == "FINISHED"
    assert run.data.metrics["train/samples_seen"] == 29
    assert 0 <= run.data.metrics["val/accuracy"] <= 1


@pytest.mark.cli
def test_mnist_files_train_one_epoch(workdir):
    root = write_mnist(workdir / "mnist")
    run_cli("data=mnist", f"data.root={root}", "model=cnn", "data.batch_size=8",
            "trainer.max_epochs=1", "trainer.progress_bar=false", cwd=workdir, check=True)
    run = _run(workdir)
    # 40 training images: round(0.1 x 40) = 4 for validation, 36 = 5 batches of 8 (the last of
    # 4) for training; the 12 test images (t10k-*) are the test split.
    assert (run.data.params["train_samples"], run.data.metrics["global_step"]) == ("36", 5)
    assert (run.data.params["val_samples"], run.data.params["test_samples"]) == ("4", "12")
    assert 0 <= run.data.metrics["test/accuracy"] <= 1
    assert run.data.tags["stepwise.tested"] == "final at global_step 5"
    assert run.data.params["data.mean"] == "[0.1307]"


def test_imagefolder_test_root_and_fractions_make_the_splits(tmp_path):
    colours = write_imagefolder(tmp_path / "colours")  # 36 images
    held = write_imagefolder(tmp_path / "held", per_class=2)  # 6
    data = prepare_job(tmp_path / "a", "data=imagefolder", f"data.root={colours}", "model=cnn",
                       f"data.test_root={held}", "dry_run=true").data
    # test from its folder; validation still round(0.1 x 36) = 4 of root, the rest trains
    assert (data.train_samples, data.val_samples, data.test_samples) == (32, 4, 6)
    assert len(data.test_set(torch.float32)) == 6 and data.test_indices is None
    assert sorted([*data.train_indices, *data.val_indices]) == list(range(36))
    data = prepare_job(tmp_path / "b", "data=imagefolder", f"data.root={colours}", "model=cnn",
                       "data.test_fraction=0.25", "dry_run=true").data
    assert (data.train_samples, data.val_samples, data.test_samples) == (23, 4, 9)
    assert sorted([*data.train_indices, *data.val_indices, *data.test_indices]) == list(range(36))
    (held / "purple").mkdir()
    (held / "green" / "0.png").rename(held / "purple" / "0.png")
    with pytest.raises(ConfigError, match="data.test_root=.*: its classes differ from data.root's"):
        prepare_job(tmp_path / "c", "data=imagefolder", f"data.root={colours}", "model=cnn",
                    f"data.test_root={held}", "dry_run=true")


@pytest.mark.cli
def test_augmentation_does_not_depend_on_loader_workers(workdir):
    """Random crops and flips are seeded per (seed, epoch, sample): 0 and 2 loader workers give
    bitwise the same weights after 2 epochs (CIFAR-style augmentation on FakeData)."""
    augment = ["data.train_transforms=[{_target_: torchvision.transforms.v2.RandomCrop, size: 32, "
               "padding: 4}, {_target_: torchvision.transforms.v2.RandomHorizontalFlip}]"]
    weights = []
    for workers in (0, 2):
        run_cli("data=fake", "data.train_samples=96", "model=cnn", "data.batch_size=16",
                "trainer.max_epochs=2", "logger=none", f"data.num_workers={workers}",
                f"hydra.run.dir=outputs/w{workers}", *augment, cwd=workdir, check=True)
        weights.append(load_checkpoint(workdir / "outputs" / f"w{workers}" / "checkpoints"
                                       / "last.pt")["model"])
    for key, value in weights[0].items():
        assert torch.equal(weights[1][key], value), key


def test_a_sample_is_augmented_by_its_epoch_and_index(tmp_path):
    job = prepare_job(tmp_path, "data=fake", "data.train_transforms=[{_target_: "
                      "torchvision.transforms.v2.RandomCrop, size: 32, padding: 4}]")
    train = job.data.train_set(torch.float32, seed=0)
    assert torch.equal(train[(0, 5)][0], train[(0, 5)][0])
    assert not torch.equal(train[(0, 5)][0], train[(1, 5)][0])  # another epoch, another crop
    before = torch.get_rng_state()
    train[(0, 5)]
    assert torch.equal(before, torch.get_rng_state())  # the main random stream is untouched


DATA = {"digits": [], "synthetic": [], "linreg": [], "fake": ["data.train_samples=64"],
        "imagefolder": ["data.root={colours}"], "mnist": ["data.root={mnist}"]}
MODELS = {"mlp": [], "linear": [], "cnn": [], "torchvision": ["model.name=resnet18"],
          "mobilenet": ["model=torchvision", "model.name=mobilenet_v3_small"]}
IMAGES = ("fake", "imagefolder", "mnist")


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("data", DATA)
def test_every_model_and_data_pair_runs_one_step(model, data, tmp_path):
    paths = {"colours": write_imagefolder(tmp_path / "colours", per_class=4),
             "mnist": write_mnist(tmp_path / "mnist", train=16, test=4)}
    overrides = [f"data={data}", *(o.format(**paths) for o in DATA[data])]
    overrides += [f"model={model}"] if model != "mobilenet" else MODELS[model]
    overrides += MODELS[model] if model == "torchvision" else []
    image_model = model in ("cnn", "torchvision", "mobilenet")
    if image_model and data not in IMAGES:
        from stepwise.contract.errors import ConfigError

        with pytest.raises(ConfigError, match="needs images"):
            prepare_job(tmp_path, *overrides)
        return
    job = prepare_job(tmp_path, *overrides, "data.batch_size=4")
    tree = job.config_dict()
    net = instantiate(tree["model"], input_shape=job.data.input_shape,
                      num_outputs=job.data.num_outputs)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01)
    train, _ = make_loaders(job.data, job.plan, Replica("single", 0, 1, torch.device("cpu")),
                            seed=0, dtype=torch.float32)
    x, y = next(iter(train))
    assert tuple(x.shape[1:]) == tuple(job.data.input_shape)
    out = net(x)
    assert out.shape == (len(x), job.data.num_outputs)
    loss = (torch.nn.functional.cross_entropy(out, y) if job.data.task == "classification"
            else torch.nn.functional.mse_loss(out, y))
    before = [p.detach().clone() for p in net.parameters()]
    loss.backward()
    optimizer.step()
    assert any(not torch.equal(b, p) for b, p in zip(before, net.parameters()))


@pytest.mark.cli
@pytest.mark.parametrize("args,expected", [
    (["data=imagefolder"], "data.root=null: not a directory; fix: set data.root="),
    (["data=imagefolder", "data.root={empty}"], "data.root={empty}: no images in class folders"),
    (["data=mnist"], "data.root=null: not set; fix: set data.root=<directory for mnist>"),
    (["data=mnist", "data.root={empty}"], "data.root={empty}: no MNIST files (MNIST/raw/*-ubyte)"),
    # CIFAR-10's loader checks md5 sums, so the tests cannot write valid files: the error path.
    (["data=cifar10", "data.root={empty}"], "data.root={empty}: no CIFAR-10 files"),
    (["data=fake", "model=torchvision", "model.name=resnet81"],
     "model.name=resnet81: not a torchvision.models builder; fix: use e.g. resnet18"),
    (["data=fake", "model=torchvision", "model.num_classes=100"],
     "model.num_classes=100: data=fake has 10 classes"),
    (["data=fake", "model=cnn", "model._target_=stepwise.models.CNN", "model.widths=[8,8,8,8]",
      "data.image_shape=[3,8,8]"], "model=cnn: cannot take data=fake's 8x8 images"),
    (["model=cnn"], "model=cnn: needs images (channels, height, width); data=digits gives"),
    (["data=fake", "data.image_shape=[1,28,28]"], "data.mean=[0.5, 0.5, 0.5]: has 3 values for "
                                                  "1-channel images"),
])
def test_bad_image_input(args, expected, workdir):
    empty = workdir / "empty"
    (empty / "some_class").mkdir(parents=True)
    args = [a.format(empty=empty) for a in args]
    proc = run_cli(*args, "dry_run=true", cwd=workdir)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and expected.format(empty=empty) in lines[0] and "fix:" in lines[0], \
        proc.stderr


def test_cifar10_resnet18_recipe(tmp_path):
    """The preset's numbers, on FakeData in CIFAR-10's shape (the real files are not here):
    lr 0.1 at batch 128 scaled linearly, 5 warmup epochs, SGD momentum 0.9, wd 5e-4."""
    job = prepare_job(tmp_path, "experiment=cifar10_resnet18", "data=fake",
                      "data.train_samples=1024", "accum=2", "data.num_workers=0")
    config, plan = job.config, job.plan
    assert (config.model.name, config.optim.momentum, config.optim.weight_decay) == \
        ("resnet18", 0.9, 5e-4)
    assert (plan.effective_batch_size, plan.lr) == (256, pytest.approx(0.2))
    assert plan.warmup_steps == 5 * plan.optimizer_steps_per_epoch
    assert config.schedule.name == "cosine" and config.trainer.max_epochs == 200


@pytest.mark.cli
def test_augmented_training_resumes_bitwise_after_sigkill(workdir):
    """Killed right after its first checkpoint and resumed mid-epoch, a run with random crops and
    flips (2 loader workers) ends with the weights of an uninterrupted run: the resumed part
    draws the same augmentation for the same (epoch, sample)."""
    from tests.integration.test_resume import _assert_identical, _kill_after_first_checkpoint

    args = ("data=fake", "data.train_samples=512", "model=cnn", "data.batch_size=16",
            "trainer.max_epochs=2", "trainer.checkpoint_every_n_steps=5", "trainer.precision=64",
            "trainer.progress_bar=false", "logger=none", "data.num_workers=2",
            "data.train_transforms=[{_target_: torchvision.transforms.v2.RandomCrop, size: 32, "
            "padding: 4}, {_target_: torchvision.transforms.v2.RandomHorizontalFlip}]")
    run_cli(*args, "hydra.run.dir=outputs/whole", cwd=workdir, check=True)
    run_dir = workdir / "outputs" / "killed"
    killed_at = _kill_after_first_checkpoint(args, workdir, run_dir, delay=0.0)
    assert 0 < killed_at < 64, killed_at
    proc = run_cli(*args, f"hydra.run.dir={run_dir}", cwd=workdir, check=True)
    assert "resumed from" in proc.stdout + proc.stderr
    whole = load_checkpoint(workdir / "outputs" / "whole" / "checkpoints" / "last.pt")
    resumed = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    assert resumed["global_step"] == whole["global_step"] == 64
    _assert_identical(resumed["model"], whole["model"])
