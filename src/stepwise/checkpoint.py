"""Checkpoints: written atomically, the last few kept, read back with `weights_only=True` only,
and the newest readable one found after a crash (a damaged file is skipped with a warning).

Layout: `checkpoints/step-00000042.pt` per save, and `checkpoints/last.pt`, a hard link to the
newest, which is what DESIGN section 2 promises.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

REQUIRED_KEYS = ("model", "optimizer", "scheduler", "global_step", "counters", "plan", "config")
STEP_FILE = re.compile(r"^step-(\d{8})\.pt$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read or does not belong to this run."""


def save_checkpoint(path: str | os.PathLike, payload: dict[str, Any]) -> Path:
    """Write `payload` to `path` through a temp file, fsync and rename: never a half file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    import torch

    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as handle:
        torch.save(payload, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)
    return path


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish(directory: Path, payload: dict[str, Any], keep: int) -> Path:
    """Save `step-<global_step>.pt`, point `last.pt` at it, and keep the newest `keep` step files."""
    path = save_checkpoint(directory / f"step-{payload['global_step']:08d}.pt", payload)
    tmp_link = directory / ".last.pt.tmp"
    tmp_link.unlink(missing_ok=True)
    os.link(path, tmp_link)
    os.replace(tmp_link, directory / "last.pt")
    for old in step_files(directory)[keep:]:
        old.unlink(missing_ok=True)
    return path


def step_files(directory: Path) -> list[Path]:
    """Step checkpoints in `directory`, newest first."""
    if not directory.is_dir():
        return []
    found = [p for p in directory.iterdir() if STEP_FILE.match(p.name)]
    return sorted(found, key=lambda p: p.name, reverse=True)


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load a checkpoint onto the CPU without unpickling arbitrary objects."""
    import torch  # here, so that finding no checkpoint costs no torch import (dry runs)

    return torch.load(path, map_location="cpu", weights_only=True)


def read_valid(path: Path) -> dict[str, Any]:
    """Load and check that the file holds a whole stepwise checkpoint; CheckpointError if not."""
    try:
        payload = load_checkpoint(path)
    except Exception as err:  # truncated zip, bad pickle, empty file, ...
        raise CheckpointError(f"{path}: unreadable ({type(err).__name__}: "
                              f"{str(err).splitlines()[0] if str(err) else ''})") from None
    missing = [k for k in REQUIRED_KEYS if not isinstance(payload, dict) or k not in payload]
    if missing:
        raise CheckpointError(f"{path}: not a stepwise checkpoint (missing {', '.join(missing)})")
    return payload


def latest_valid(directory: Path) -> tuple[Path, dict[str, Any]] | None:
    """The newest readable step checkpoint in `directory`; damaged ones are skipped, with a warning."""
    for path in step_files(directory):
        try:
            return path, read_valid(path)
        except CheckpointError as err:
            log.warning("skipping damaged checkpoint %s; trying the previous one", err)
    return None
