"""Every config group option and experiment composes against its schema and builds, and every
`_target_` the packaged config names resolves."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra._internal.utils import _locate
from omegaconf import OmegaConf

from stepwise.config.components import locate
from stepwise.config.schemas import SCHEMAS
from stepwise.contract.errors import ConfigError
from stepwise.data.arrays import build_data
from stepwise.main import CONF_DIR
from stepwise.run.build import DEFAULT_LOSS, build_model, build_optimizer
from stepwise.run.job import prepare
from tests.conftest import compose_config

GROUPS = ["model", "data", "parallel", "optim", "loss", "metrics", "lr_scaling", "schedule",
          "trainer", "logger", "debug", "experiment"]
# Every folder of options under conf/ (hydra/launcher, hparams_search too): composed for its targets.
ALL_GROUPS = sorted({p.parent.relative_to(CONF_DIR).as_posix() for p in CONF_DIR.glob("**/*.yaml")
                    if p.parent != CONF_DIR})
# data=dataset takes the user's own Dataset (tests/fixtures/userpkg); the rest are complete.
COMPLETING = {"data=dataset": ["data.train={_target_: tests.fixtures.userpkg.data.Vectors, "
                               "size: 10}"],
              "loss=mse": ["data=linreg"],
              # sequences and the model that takes them go together
              "data=tinytext": ["model=tiny_lm"], "model=tiny_lm": ["data=tinytext"]}


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


@pytest.mark.parametrize("override", [f"{g}={o}" for g in GROUPS for o in _options(g)])
def test_every_option_composes_and_builds(override, tmp_path: Path):
    if override in ("data=imagefolder", "data=mnist", "data=cifar10", "model=cnn",
                    "model=torchvision", "experiment=cifar10_resnet18"):
        pytest.skip("needs image files or image data: tests/integration/test_images.py")
    config = compose_config(override, *COMPLETING.get(override, []))
    if override == "parallel=dp" and not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="DataParallel needs CUDA devices"):
            prepare(config, run_dir=tmp_path, start_dir=tmp_path)
        return
    if override == "parallel=fsdp" and tuple(map(int, torch.__version__.split(".")[:2])) < (2, 6):
        with pytest.raises(ConfigError, match="needs torch >= 2.6"):  # the torch floor's run
            prepare(config, run_dir=tmp_path, start_dir=tmp_path)
        return
    job = prepare(config, run_dir=tmp_path, start_dir=tmp_path)
    model = build_model(job.config, job.data)
    optimizer = build_optimizer(job.config, job.plan, model.parameters())
    if hasattr(job.data, "collate"):  # a user's Dataset: its samples through its collate
        from stepwise.data.batches import call_model

        dataset = job.data.train_set(torch.float32, 0)
        inputs, target = job.data.collate(torch.float32)([dataset[i] for i in range(3)])
        out = call_model(model, inputs)
        assert out.shape == (3, job.data.num_outputs, *target.shape[1:])  # (N, C, ...)
    else:
        out = model(torch.as_tensor(job.data.x_train[:3]) if hasattr(job.data, "x_train")
                    else torch.stack([job.data.train_set(torch.float32, 0)[i][0] for i in range(3)]))
        assert out.shape == (3, job.data.num_outputs)
    assert optimizer.param_groups[0]["lr"] == job.plan.lr


def test_default_config_values():
    config = compose_config()
    assert (config.model.hidden_sizes, config.data.batch_size, config.accum) == ([128, 128], 32, None)
    assert type(config.optim).__name__ == "SGDConfig" and config.optim.momentum == 0.9
    data = build_data({"_target_": "stepwise.data.digits", "batch_size": 1})
    assert (data.train_samples, data.val_samples, data.test_samples, data.input_shape) == (
        1438, 180, 179, (64,))


def test_linreg_experiment_is_the_textbook_setup():
    config = compose_config("experiment=linreg_accum")
    assert (config.data.batch_size, config.accum, config.optim.lr) == (10, 4, 0.01)
    data = build_data({"_target_": "stepwise.data.linreg", "seed": 0})
    x, y = data.x_train.astype(float), data.y_train[:, 0].astype(float)
    residual = y - (x @ [-2.0, 3.4] + 4.2)
    assert len(x) == 1000 and abs(residual.std() - 0.01) < 0.002


def _targets(node, key: str = ""):
    """(key, `_target_`) of every node of a config tree, nested ones (data.train,
    data.collate_fn, data.train_transforms[0], hydra.callbacks.*) included."""
    if isinstance(node, dict):
        for name, value in node.items():
            if name == "_target_":
                yield key, value
            else:
                yield from _targets(value, f"{key}.{name}" if key else str(name))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _targets(value, f"{key}[{i}]")


def _resolves(key: str, target: str) -> None:
    """Hydra's `_locate` (what `instantiate` uses) and stepwise's `components.locate` (what
    `components.build` uses) find the same object."""
    from stepwise.config.vision_import import torchvision

    torchvision()  # importable next to a CPU torch (as stepwise imports it before transforms)
    found = _locate(target)
    assert locate(key, target) is found, (key, target)
    assert callable(found), (key, target)


@pytest.mark.parametrize("override", [f"{g}={o}" for g in ALL_GROUPS for o in _options(g)])
def test_every_target_of_every_option_resolves(override):
    if override == "hparams_search=optuna":
        pytest.importorskip("hydra_plugins.hydra_optuna_sweeper", reason="the optuna extra")
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[override, *COMPLETING.get(override, [])],
                      return_hydra_config=True)
    targets = dict(_targets(OmegaConf.to_container(cfg, resolve=False)))
    group = override.split("=")[0]
    if group in ("model", "data", "loss", "optim"):  # the option's own component
        assert group in targets, sorted(targets)
    # stepwise's callbacks are in every composition (conf/config.yaml)
    assert {"hydra.callbacks.run_dir", "hydra.callbacks.sweep_parent"} <= set(targets)
    for key, target in targets.items():
        _resolves(key, target)
        if target.startswith("stepwise.") and not key.startswith("hydra."):  # a built-in component
            assert target.startswith(("stepwise.models.", "stepwise.data.", "stepwise.callbacks.")) and \
                target.count(".") == 2, f"{override}: {key}: {target} is not its short path"


def test_every_schema_default_target_resolves():
    """The schemas' `_target_` defaults (an option that names none keeps its schema's) and the
    default losses by task."""
    defaults = {f"{group}={name}": schema._target_ for group, options in SCHEMAS.items()
                for name, schema in options.items() if getattr(schema, "_target_", "???") != "???"}
    defaults |= {f"loss for {task}": node["_target_"] for task, node in DEFAULT_LOSS.items()}
    assert "model=mlp" in defaults and "data=digits" in defaults
    for key, target in defaults.items():
        assert not target.startswith("stepwise.") or (
            target.startswith(("stepwise.models.", "stepwise.data.")) and target.count(".") == 2), (
            f"{key}: {target} is not a short path (stepwise.models.X, stepwise.data.X)")
        _resolves(key, target)
