"""What `stepwise eval` and `stepwise predict` work on: a run (by MLflow run id or run directory)
or a checkpoint file, its checkpoint (`which=last|best`), its own saved config with the data
overrides given, the evaluation split, and the world to compute on; each mistake is one line.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stepwise.config.saved import OfflineArgs, saved_config
from stepwise.config.schemas import Config
from stepwise.contract.errors import ConfigError
from stepwise.contract.world import World
from stepwise.run.checkpoint import BEST_FILE, CheckpointError, read_valid

RUN_ID = re.compile(r"^[0-9a-f]{32}$")  # an MLflow run id
CONFIG_FILE = "config.yaml"  # the run's resolved config, written by main.py


@dataclass(frozen=True)
class Selection:
    """A checkpoint, the config and data to evaluate it on, and where to log (pickled to each
    spawned rank under `parallel=ddp`; the weights are read from `checkpoint` by each).

    Attributes:
        config: the run's config, with the data overrides, this command's parallel and device.
        label: the checkpoint's name in file names: `last`, `best`, or the file's stem.
        run_id, tracking_uri: the MLflow run to log into (None: the run logged to no MLflow).
        batch_size: samples per batch per rank (the run's `data.batch_size`, or the one its
            `data.batch_size=auto` chose).
    """

    args: OfflineArgs
    config: Config
    data: Any
    samples: int
    checkpoint: Path
    global_step: int
    label: str
    run_dir: Path | None
    run_id: str | None
    tracking_uri: str | None
    world: World
    batch_size: int

    @property
    def split(self) -> str:
        return self.args.split

    @property
    def name(self) -> str:
        """What the results are named by: `eval/<name>/*`, the tag, the predictions file (the
        split's, `<split>_ema` for `weights=ema`)."""
        weights = "" if self.args.weights == "model" else f"_{self.args.weights}"
        return self.args.name or f"{self.split}{weights}"

    @property
    def data_overrides(self) -> list[str]:
        """`data=<option>` and the `data.<key>=<value>` that change the samples (not the loader
        keys: `data.batch_size` changes no number)."""
        from stepwise.data.arrays import LOADER_KEYS

        option = [f"data={self.args.data_option}"] if self.args.data_option else []
        return option + [text for text in self.args.data_overrides
                         if text.split("=", 1)[0][len("data."):] not in LOADER_KEYS]

    def record(self) -> dict[str, Any]:
        """Which checkpoint and which data: the tag set on the run."""
        data = dataclasses.asdict(self.config.data) if dataclasses.is_dataclass(self.config.data) \
            else dict(self.config.data)
        overrides = ([f"data={self.args.data_option}"] if self.args.data_option else []) + \
            list(self.args.data_overrides)
        return {"checkpoint": str(self.checkpoint), "global_step": self.global_step,
                "name": self.name, "split": self.split, "weights": self.args.weights,
                "samples": self.samples, "data": data_name(data),
                "data_target": data.get("_target_"), "data_overrides": overrides,
                "world_size": self.world.size}


def data_name(data: dict[str, Any]) -> str:
    """How lines name the data: `digits`, or a user's dataset class."""
    train = data.get("train")
    target = train.get("_target_", "?") if isinstance(train, dict) else data.get("_target_", "?")
    return str(target).rsplit(".", 1)[-1]


def select(args: OfflineArgs) -> Selection:
    """Find the run and checkpoint `args` name, rebuild the config that trained it (with the
    data overrides), and check that its model takes that data. ConfigError on any mistake."""
    import yaml

    from stepwise.contract.dist_env import detect
    from stepwise.contract.world import resolve_world
    from stepwise.data.arrays import build_data
    from stepwise.run.job import DEVICES, visible_gpus

    run_dir, run_id, uri = _locate(args)
    path = _checkpoint_path(args, run_dir)
    payload = _read(path, args)
    saved = run_dir / CONFIG_FILE if run_dir is not None else None
    tree = yaml.safe_load(saved.read_text()) if saved is not None and saved.is_file() \
        else payload["config"]
    config = saved_config(tree, args)
    if config.trainer.device not in DEVICES:
        raise ConfigError("trainer.device", config.trainer.device, "unknown value",
                          f"use one of {', '.join(DEVICES)}")
    run_id = run_id or payload.get("mlflow_run_id")
    if run_id is not None and uri is None:
        uri = _tracking_uri(args, run_dir, tree, run_id)
    data = build_data(dataclasses.asdict(config.data))
    samples = _split_samples(args.split, data, dataclasses.asdict(config.data))
    _check_model(config, data, checkpoint_weights(payload, args, path), tree, args)
    world = resolve_world(config.parallel, config.trainer.device, detect(os.environ),
                          visible_gpus(config))
    batch = config.data.batch_size
    if batch == "auto":
        batch = int(payload["plan"]["per_device_batch_size"])
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ConfigError("data.batch_size", batch, "must be a positive integer",
                          "set e.g. data.batch_size=256")
    label = path.stem if args.ckpt is not None else args.which
    return Selection(args=args, config=config, data=data, samples=samples, checkpoint=path,
                     global_step=int(payload["global_step"]), label=label, run_dir=run_dir,
                     run_id=run_id, tracking_uri=uri if run_id is not None else None,
                     world=world, batch_size=batch)


def checkpoint_weights(payload: dict[str, Any], args: OfflineArgs, path: Path) -> dict[str, Any]:
    """The weights `args.weights` names in the checkpoint: its model's, or a callback's average."""
    from stepwise.run.checkpoint import averaged_weights

    if args.weights == "model":
        return payload["model"]
    weights = averaged_weights(payload, args.weights)
    if weights is None:
        raise ConfigError("weights", args.weights, f"{path} holds no {args.weights} weights (the "
                          f"run had no callback that keeps them, e.g. callbacks={args.weights})",
                          "use weights=model")
    return weights


def _locate(args: OfflineArgs) -> tuple[Path | None, str | None, str | None]:
    """(run directory, MLflow run id, tracking URI), as far as `run=` or `ckpt=` tells them."""
    from stepwise.tracking.addendum import RUN_DIR_TAG, find_run
    from stepwise.tracking.tracker import default_tracking_uri

    if args.ckpt is not None:
        path = Path(args.ckpt).expanduser().resolve()
        run_dir = path.parent.parent if path.parent.name == "checkpoints" else None
        return _run_dir_or_none(run_dir), None, None
    found = Path(args.run).expanduser()
    if found.is_dir():
        run_dir = found.resolve()
        if not (run_dir / CONFIG_FILE).is_file() and not (run_dir / "checkpoints").is_dir():
            raise ConfigError("run", args.run, f"a directory with no {CONFIG_FILE} and no "
                              "checkpoints/: not a stepwise run directory",
                              "give the run's directory (hydra.run.dir), or its MLflow run id")
        id_file = run_dir / ".mlflow_run_id"
        return run_dir, id_file.read_text().strip() if id_file.is_file() else None, None
    if not RUN_ID.match(args.run):
        raise ConfigError("run", args.run, "no such run directory, and not an MLflow run id "
                          "(32 hex digits)", "give a run directory or a run id from the MLflow UI")
    uri = args.tracking_uri or default_tracking_uri(None, Path.cwd())
    run = find_run(uri, args.run)
    if run is None:
        raise ConfigError("run", args.run, f"no such MLflow run in {uri}",
                          "run from the directory that holds the run's mlflow.db, or give "
                          "logger.tracking_uri=<its store>")
    run_dir = run["tags"].get(RUN_DIR_TAG)
    if run_dir is None or not Path(run_dir).is_dir():
        raise ConfigError("run", args.run, f"the run's directory ({RUN_DIR_TAG}: {run_dir}) is not "
                          "on this machine", "give run=<its run directory> or ckpt=<a checkpoint>")
    return Path(run_dir), args.run, uri


def _run_dir_or_none(run_dir: Path | None) -> Path | None:
    return run_dir if run_dir is not None and (run_dir / CONFIG_FILE).is_file() else None


def _start_dir(run_dir: Path | None) -> Path:
    """The directory training was started from (Hydra's `runtime.cwd`), where its default
    sqlite store is; else this one."""
    import yaml

    hydra_file = run_dir / ".hydra" / "hydra.yaml" if run_dir is not None else None
    if hydra_file is not None and hydra_file.is_file():
        cwd = (yaml.safe_load(hydra_file.read_text()) or {}).get("hydra", {}).get("runtime", {})
        if isinstance(cwd, dict) and cwd.get("cwd"):
            return Path(cwd["cwd"])
    return Path.cwd()


def _tracking_uri(args: OfflineArgs, run_dir: Path | None, tree: dict[str, Any],
                  run_id: str) -> str:
    """The store of the run: `logger.tracking_uri` given, the run's own, $MLFLOW_TRACKING_URI,
    or the sqlite file of the directory its training started from; it must hold the run."""
    from stepwise.tracking.addendum import find_run
    from stepwise.tracking.tracker import default_tracking_uri

    configured = args.tracking_uri or (tree.get("logger") or {}).get("tracking_uri")
    uri = default_tracking_uri(configured, _start_dir(run_dir))
    if find_run(uri, run_id) is None:
        raise ConfigError("logger.tracking_uri", uri, f"holds no MLflow run {run_id} (the run "
                          "this checkpoint logged to)", "give logger.tracking_uri=<the store the "
                          "run logged to>")
    return uri


def _checkpoint_path(args: OfflineArgs, run_dir: Path | None) -> Path:
    if args.ckpt is not None:
        path = Path(args.ckpt).expanduser().resolve()
        if not path.is_file():
            raise ConfigError("ckpt", args.ckpt, "no such file",
                              "give a checkpoint file (<run dir>/checkpoints/last.pt)")
        return path
    path = run_dir / "checkpoints" / (BEST_FILE if args.which == "best" else "last.pt")
    if not path.is_file():
        why = (" (best.pt is kept by trainer.monitor)" if args.which == "best" else
               " (the run wrote no checkpoint yet)")
        raise ConfigError("which", args.which, f"{path.parent} has no {path.name}{why}",
                          "use which=last" if args.which == "best" else
                          "give a run that trained, or ckpt=<a checkpoint file>")
    return path


def _read(path: Path, args: OfflineArgs) -> dict[str, Any]:
    try:
        return read_valid(path)
    except CheckpointError as err:
        key, value = ("ckpt", args.ckpt) if args.ckpt is not None else ("which", args.which)
        raise ConfigError(key, value, f"{path}: {err.problem}", "give a checkpoint stepwise "
                          "wrote (<run dir>/checkpoints/last.pt or best.pt)") from None


def _split_samples(split: str, data: Any, data_cfg: dict[str, Any]) -> int:
    from stepwise.data.loaders import EVAL_SPLITS, split_samples

    if split not in EVAL_SPLITS:
        raise ConfigError("split", split, "unknown split", f"use one of {', '.join(EVAL_SPLITS)}")
    samples = split_samples(data, split)
    if samples == 0:
        other = next(s for s in EVAL_SPLITS if s != split)
        fix = (f"use split={other}, or data with a test split (data.test=... for a dataset of "
               "yours)" if split == "test" else
               f"use split={other}, or data with validation samples")
        raise ConfigError("split", split, f"data={data_name(data_cfg)} has no {split} split "
                          f"(0 samples)", fix)
    return samples


def _check_model(config: Config, data: Any, weights: dict[str, Any], tree: dict[str, Any],
                 args: OfflineArgs) -> None:
    """The model the run's config builds for this data must take the checkpoint's weights, shape
    for shape: else the data is another shape than the run's (one line, naming the override)."""
    from stepwise.run.build import build_model

    built = {k: tuple(v.shape) for k, v in build_model(config, data).state_dict().items()}
    saved = {k: tuple(v.shape) for k, v in weights.items()}
    if built == saved:
        return
    first = next(k for k in sorted(set(built) | set(saved)) if built.get(k) != saved.get(k))
    shown = [list(s) if s is not None else "absent" for s in (saved.get(first), built.get(first))]
    trained = _shape_words(tree.get("data") or {})
    overrides = ([f"data={args.data_option}"] if args.data_option else []) + \
        list(args.data_overrides)
    key, _, value = (" ".join(overrides) or f"run={args.run or args.ckpt}").partition("=")
    raise ConfigError(key, value, f"the checkpoint's model does not take this data: it was "
                      f"trained on {trained}, this data gives {_shape_words(data)} ({first}: "
                      f"{shown[0]} in the checkpoint, {shown[1]} for this data)",
                      "evaluate data of the shape the model was trained on, or a run "
                      "trained on this data")


def _shape_words(data: Any) -> str:
    """`input_shape [64], num_outputs 10`: of a data object, or of a saved data config (built)."""
    if isinstance(data, dict):
        from stepwise.data.arrays import build_data

        name = data_name(data)
        try:
            data = build_data(data)
        except Exception:  # the run's own data, now unreadable: its name says enough
            return f"data={name}"
        return f"data={name} ({_shape_words(data)})"
    keys = data.shape_keys()
    shape = keys.get("input_shape")
    return (f"input_shape {list(shape) if shape is not None else None}, "
            f"num_outputs {keys.get('num_outputs')}")
