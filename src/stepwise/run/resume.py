"""Which checkpoint a run resumes from (`trainer.resume=auto|none|<path>`), and whether it belongs
to this run: same model, data, optimizer and the same windows of samples (DESIGN rule 1), so that a
resume on another world size with the same effective batch continues the same training.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from stepwise.contract.errors import ConfigError
from stepwise.run.checkpoint import CheckpointError, latest_valid, read_valid

# Config sections whose every key must match, but for these loader and parallel settings, which
# may change between the interrupted run and its resume.
MATCHED_SECTIONS = ("model", "data", "optim", "lr_scaling", "schedule")
FREE_KEYS = {"data.batch_size", "data.num_workers"}
MATCHED_TOP = ("seed",)
MATCHED_TRAINER = ("precision", "partial_window")
# Plan numbers that fix which samples each optimizer step sees and at which LR.
MATCHED_PLAN = ("train_samples", "effective_batch_size", "optimizer_steps_per_epoch",
                "samples_per_epoch", "last_window_samples", "lr", "schedule")


def find_checkpoint(resume: str, run_dir: Path) -> Path | None:
    """The checkpoint file to resume from, or None to start afresh.

    `auto`: the newest readable one in this run directory (none: start afresh); a path: that
    file, or the newest readable one of that run directory.
    """
    if resume == "none":
        return None
    if resume == "auto":
        found = latest_valid(run_dir / "checkpoints")
        return found[0] if found else None
    path = Path(resume).expanduser()
    if path.is_dir():
        found = latest_valid(path / "checkpoints") or latest_valid(path)
        if found is None:
            raise ConfigError("trainer.resume", resume, "no readable checkpoint in that directory",
                              "give a checkpoint file or a run directory with checkpoints/")
        return found[0]
    if not path.exists():
        raise ConfigError("trainer.resume", resume, "no such file",
                          "give an existing checkpoint, or trainer.resume=auto|none")
    try:
        read_valid(path)
    except CheckpointError as err:
        raise ConfigError("trainer.resume", resume, err.problem,
                          "give a checkpoint stepwise wrote (<run dir>/checkpoints/last.pt), a run "
                          "directory, or trainer.resume=auto|none") from None
    return path


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict):
        return {prefix: tree}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out.update(_flatten(value, f"{prefix}.{key}" if prefix else key))
    return out


def differences(checkpoint: dict[str, Any], config: dict[str, Any], plan: dict[str, Any]) -> list[str]:
    """What makes `checkpoint` another run's: 'key: checkpoint value != this run's value'."""
    saved_cfg, saved_plan = checkpoint["config"], checkpoint["plan"]
    pairs: dict[str, tuple[Any, Any]] = {}
    for section in MATCHED_SECTIONS:
        old, new = _flatten(saved_cfg.get(section, {}), section), _flatten(config[section], section)
        for key in sorted(set(old) | set(new)):
            if key not in FREE_KEYS:
                pairs[key] = (old.get(key), new.get(key))
    for key in MATCHED_TOP:
        pairs[key] = (saved_cfg.get(key), config[key])
    for key in MATCHED_TRAINER:
        pairs[f"trainer.{key}"] = (saved_cfg["trainer"].get(key), config["trainer"][key])
    for key in MATCHED_PLAN:
        pairs[f"plan.{key}"] = (saved_plan.get(key), plan[key])
    return [f"{key}: {old!r} != {new!r}" for key, (old, new) in pairs.items()
            if _normal(old) != _normal(new)]


def _normal(value: Any) -> Any:
    """Tuples and lists compare alike (checkpoints store lists)."""
    if isinstance(value, (list, tuple)):
        return [_normal(v) for v in value]
    if isinstance(value, dict):
        return {k: _normal(v) for k, v in value.items()}
    return value


def check_compatible(path: Path, checkpoint: dict[str, Any], config: dict[str, Any],
                     plan: dict[str, Any]) -> None:
    """Raise a ConfigError naming what differs if `checkpoint` is not this run's."""
    wrong = differences(checkpoint, config, plan)
    if wrong:
        shown = "; ".join(wrong[:4]) + (f"; and {len(wrong) - 4} more" if len(wrong) > 4 else "")
        raise ConfigError("trainer.resume", str(path), f"the checkpoint is another run's ({shown})",
                          "resume with the config that made it, or trainer.resume=none")


def resume_state(job) -> dict[str, Any] | None:
    """The checkpoint this job continues, checked against its config (ConfigError if foreign)."""
    if job.resume_from is None:
        return None
    from stepwise.run.checkpoint import load_checkpoint

    state = load_checkpoint(job.resume_from)
    check_compatible(job.resume_from, state, job.config_dict(), job.plan.to_dict())
    if state.get("sharded"):  # an FSDP checkpoint: its shards must fit the model (any mode)
        from stepwise.parallel.fsdp import check_shards
        from stepwise.run.build import build_model

        check_shards(job.resume_from, state, lambda: build_model(job.config, job.data))
    return state
