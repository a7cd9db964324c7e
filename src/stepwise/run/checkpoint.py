"""Checkpoints: written atomically, the last few kept, read back with `weights_only=True` only,
and the newest readable one found after a crash (a damaged file is skipped with a warning).

Layout: `checkpoints/step-00000042.pt` per save, and `checkpoints/last.pt`, a hard link to the
newest, which is what DESIGN section 2 promises. Under FSDP, each step file has a directory of
shards beside it, `step-00000042.dcp/` (stepwise.parallel.fsdp).
"""

from __future__ import annotations

import logging
import os
import re
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from stepwise.parallel.fsdp import remove_shards, shard_dir_problem, write_shards

log = logging.getLogger(__name__)

REQUIRED_KEYS = ("model", "optimizer", "scheduler", "global_step", "counters", "plan", "config")
STEP_FILE = re.compile(r"^step-(\d{8})\.pt$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read or does not belong to this run: `problem` says why."""

    def __init__(self, path: Path, problem: str) -> None:
        self.path, self.problem = path, problem
        super().__init__(f"{path}: {problem}")


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
        remove_shards(old)
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
    kind = _not_torch_file(path)
    if kind is not None:
        raise CheckpointError(path, f"{kind}, not a torch checkpoint file (torch.save output)")
    try:
        with warnings.catch_warnings():  # torch's notes on odd pickles: the error says enough
            warnings.simplefilter("ignore")
            payload = load_checkpoint(path)
    except Exception as err:  # truncated zip, bad pickle, ...
        raise CheckpointError(path, _load_failure(err)) from None
    missing = [k for k in REQUIRED_KEYS if not isinstance(payload, dict) or k not in payload]
    if missing:
        raise CheckpointError(path, f"a torch file but not a stepwise checkpoint (missing "
                                    f"{', '.join(missing)})")
    if payload.get("sharded") and (problem := shard_dir_problem(path.parent / payload["sharded"])):
        raise CheckpointError(path, problem)
    return payload


# torch.save writes a zip archive holding <name>/data.pkl; before torch 1.6 (and with
# _use_new_zipfile_serialization=False), a pickle stream that starts with this magic number.
ZIP_MAGIC = b"PK\x03\x04"
LEGACY_MAGIC = b"\x80\x02\x8a\nl\xfc\x9cF\xf9 j\xa8P\x19"


def _not_torch_file(path: Path) -> str | None:
    """What the file plainly is when it is not torch.save output ("a text file", ...), or None
    when it may be one (torch.load then decides)."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(4096)
    except OSError as err:
        return f"a file that cannot be opened ({err.strerror})"
    if head.startswith(LEGACY_MAGIC):
        return None
    if head.startswith(ZIP_MAGIC):
        try:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
        except (zipfile.BadZipFile, OSError):
            return None  # a torch file cut short, as by a full disk: torch.load says so
        return None if any(n.rpartition("/")[2] == "data.pkl" for n in names) else "a zip archive"
    if not head:
        return "an empty file"
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return "a Python pickle"  # pickle.dump's PROTO opcode; torch.save's would be the above
    return "a text file" if _is_text(head) else "a binary file"


def _is_text(head: bytes) -> bool:
    if b"\x00" in head:
        return False
    for cut in range(4):  # the 4096th byte may end inside a multi-byte character
        try:
            head[:len(head) - cut].decode("utf-8")
            return True
        except UnicodeDecodeError:
            continue
    return False


def _load_failure(err: Exception) -> str:
    """torch.load's refusal of a file that looks like torch.save output, in a user's words."""
    import pickle

    if isinstance(err, pickle.UnpicklingError) and "weights_only" in str(err):
        return ("a torch file holding Python objects besides tensors and plain containers, which "
                "torch.load(weights_only=True) refuses to unpickle")
    reason = str(err).strip().splitlines()[0][:120] if str(err).strip() else type(err).__name__
    return f"a damaged or truncated torch checkpoint file (torch.load: {reason})"


def latest_valid(directory: Path) -> tuple[Path, dict[str, Any]] | None:
    """The newest readable step checkpoint in `directory`; damaged ones are skipped, with a warning."""
    for path in step_files(directory):
        try:
            return path, read_valid(path)
        except CheckpointError as err:
            log.warning("skipping damaged checkpoint %s; trying the previous one", err)
    return None


def averaged_weights(payload: dict[str, Any], suffix: str) -> dict[str, Any] | None:
    """The weights a callback that evaluates as `suffix` (the EMA's `ema`) keeps in a checkpoint,
    as the bare model's full state dict; None when the checkpoint has none."""
    for state in (payload.get("callbacks") or {}).values():
        if isinstance(state, dict) and state.get("evaluates") == suffix and "weights" in state:
            return state["weights"]
    return None


BEST_FILE = "best.pt"  # trainer.monitor's best evaluation; never a resume candidate (auto)


def _payload(job, tracker, trainer, shards: Path | None = None) -> dict[str, Any] | None:
    """The checkpoint of `trainer` now, on the main rank (None elsewhere; every rank gathers, and
    under FSDP writes its shards into `shards`). The metrics logged so far reach the store first
    while it answers, so that a run killed after this checkpoint and resumed from it has them
    all (it logs from the checkpoint's step on)."""
    state = trainer.state_dict()
    if shards is not None:
        write_shards(trainer, shards, state)  # FSDP: every rank's shards
    if not trainer.replica.is_main:
        return None
    tracker.sync_while_up()
    state.update(epoch=trainer.counters.epoch, samples_seen=trainer.counters.samples_seen,
                 plan=job.plan.to_dict(), config=job.config_dict(), mlflow_run_id=tracker.run_id)
    return state


def checkpoint_saver(job, tracker) -> Callable:
    """Save a checkpoint (every rank gathers; rank 0 writes step-N.pt and last.pt)."""

    def save(trainer) -> None:
        state = _payload(job, tracker, trainer, job.run_dir / "checkpoints")
        if state is None:
            return
        path = publish(job.run_dir / "checkpoints", state, job.config.trainer.keep_checkpoints)
        log.info("checkpoint at global_step %d: %s", trainer.counters.global_step, path)

    return save


def best_saver(job, tracker) -> Callable:
    """Save `checkpoints/best.pt` (every rank gathers; rank 0 writes): last.pt's format, plus
    `monitor`, `monitor_mode` and `best_value`."""

    def save_best(trainer) -> None:
        state = _payload(job, tracker, trainer)
        if state is None:
            return
        monitor = trainer.best.monitor
        state.update(monitor=monitor.name, monitor_mode=monitor.mode, best_value=monitor.best)
        path = save_checkpoint(job.run_dir / "checkpoints" / BEST_FILE, state)
        log.info("best %s=%.6g at global_step %d: %s", monitor.name, monitor.best,
                 trainer.counters.global_step, path)

    return save_best
