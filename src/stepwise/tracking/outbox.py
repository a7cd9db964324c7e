"""The MLflow outbox: what a run logs is queued here and sent by a background thread.

The training thread only appends to a queue (or, past a bound, to a file): it never waits for
the tracking store. A store that does not answer (a server restarting, a sqlite file locked by
other jobs) is retried in the background with a backoff while training goes on; what is still
unsent when the job ends is written to `<run dir>/mlflow_unsent/` and
`python -m stepwise.tracking.replay <run dir>` sends it later (stepwise/tracking/replay.py).

An operation is a JSON-able tuple, so that it can be written to disk as it is:
    ("metrics", [[key, value, timestamp_ms, step], ...])
    ("params", {key: value}), ("tags", {key: value})
    ("artifact", local_path, artifact_path or None)
    ("terminate", status, end_time_ms)
"""

from __future__ import annotations

import collections
import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("stepwise.tracking")

UNSENT_DIR = "mlflow_unsent"
MAX_QUEUED_VALUES = 200_000  # metric values (or params, tags) held in memory before spilling
SEGMENT_VALUES = 20_000  # values per spilled file, so that reading one back stays bounded
BATCH = {"metrics": 1000, "params": 100, "tags": 100}  # MLflow's log_batch limits
BACKOFF_S = (0.5, 1, 2, 5)  # between tries while the store does not answer (then every 5 s)

Op = tuple


def size(op: Op) -> int:
    """How many values an operation holds (what the memory bound counts)."""
    return len(op[1]) if op[0] in BATCH else 1


def send(client, run_id: str, op: Op, writer=None) -> None:
    """Send one operation with an MlflowClient (in MLflow's batch limits); metric values with
    `writer` when there is one (a sqlite store: stepwise/tracking/sqlite_metrics.py)."""
    from mlflow.entities import Metric, Param, RunTag

    kind = op[0]
    if kind == "metrics" and writer is not None:
        writer.log(run_id, op[1])
    elif kind == "metrics":
        values = [Metric(key, value, ts, step) for key, value, ts, step in op[1]]
        for i in range(0, len(values), BATCH[kind]):
            client.log_batch(run_id, metrics=values[i:i + BATCH[kind]])
    elif kind in ("params", "tags"):
        entity = Param if kind == "params" else RunTag
        values = [entity(key, str(value)) for key, value in op[1].items()]
        for i in range(0, len(values), BATCH[kind]):
            client.log_batch(run_id, **{kind: values[i:i + BATCH[kind]]})
    elif kind == "artifact":
        if Path(op[1]).exists():
            client.log_artifact(run_id, op[1], op[2])
        else:
            log.warning("MLflow artifact %s: the file is gone, not sent", op[1])
    elif kind == "terminate":
        client.set_terminated(run_id, status=op[1], end_time=op[2])
    else:
        raise ValueError(f"unknown outbox operation {kind!r}")


def permanent(err: Exception) -> bool:
    """An error that retrying cannot mend: the store understood the request and refused it
    (HTTP 4xx, e.g. an invalid value). Connection failures, timeouts, 5xx and a locked sqlite
    file are worth retrying."""
    from mlflow.exceptions import MlflowException

    if not isinstance(err, MlflowException):
        return False
    status = err.get_http_status_code()
    return 400 <= status < 500 and status not in (408, 429)


class Spool:
    """Operations on disk, in files of at most SEGMENT_VALUES values, oldest first by name.

    Each file starts with a header line naming the run, then one JSON operation per line.
    """

    def __init__(self, directory: Path, run_id: str, tracking_uri: str) -> None:
        self.directory = directory
        self.header = {"run_id": run_id, "tracking_uri": tracking_uri}
        self._current: Path | None = None
        self._current_values = 0

    def files(self) -> list[Path]:
        return sorted(self.directory.glob("*.jsonl")) if self.directory.exists() else []

    def append(self, op: Op) -> None:
        """Add an operation to the newest file (a new one when it is full)."""
        if self._current is None or self._current_values >= SEGMENT_VALUES:
            self._current, self._current_values = self._new_file(), 0
        with open(self._current, "a") as handle:
            handle.write(json.dumps(op) + "\n")
        self._current_values += size(op)

    def write(self, ops: list[Op]) -> Path:
        """All of `ops` in one new file."""
        path = self._new_file()
        with open(path, "a") as handle:
            handle.writelines(json.dumps(op) + "\n" for op in ops)
        return path

    def take_oldest(self) -> list[Op]:
        """The oldest file's operations; the file is removed (its ops are then in memory)."""
        files = [path for path in self.files() if path != self._current]
        if not files:
            if self._current is None:
                return []
            files, self._current = [self._current], None
        ops = read_ops(files[0])[1]
        files[0].unlink()
        return ops

    def _new_file(self) -> Path:
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / f"{time.time_ns():020d}-{os.getpid()}.jsonl"
        path.write_text(json.dumps(self.header) + "\n")
        return path


def read_ops(path: Path) -> tuple[dict[str, str], list[Op]]:
    """A spooled file's header and operations."""
    lines = path.read_text().splitlines()
    return json.loads(lines[0]), [tuple(json.loads(line)) for line in lines[1:] if line.strip()]


class Outbox:
    """A queue of operations for one MLflow run, sent in order by a daemon thread.

    Args:
        client: an MlflowClient for the run's store.
        run_id: the run every operation goes to.
        tracking_uri: the store's URI (written with spooled operations, for the replay).
        spool_dir: where operations go past the memory bound and at the end (None: nowhere;
            the bound is then not enforced, for short-lived runs such as a sweep's parent).
        max_values: the memory bound, in values.
    """

    def __init__(self, client, run_id: str, tracking_uri: str, spool_dir: Path | None,
                 max_values: int = MAX_QUEUED_VALUES) -> None:
        from stepwise.tracking.sqlite_metrics import open_writer

        self.client, self.run_id, self.max_values = client, run_id, max_values
        self.writer = open_writer(tracking_uri)
        self.spool = Spool(spool_dir, run_id, tracking_uri) if spool_dir is not None else None
        self._queue: collections.deque[Op] = collections.deque()
        self._values = 0
        self._spilled = False  # some operations wait on disk
        self._closing = False
        self._sending: Op | None = None
        self._down_since: float | None = None
        self._lock = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="stepwise-mlflow", daemon=True)
        self._thread.start()

    def put(self, op: Op) -> None:
        """Queue an operation; never waits for the store."""
        with self._lock:
            if self.spool is not None and (self._spilled or
                                           self._values + size(op) > self.max_values):
                self.spool.append(op)  # past the bound: on disk, in order, until sent
                self._spilled = True
            else:
                self._queue.append(op)
                self._values += size(op)
            self._lock.notify_all()

    def drain(self, timeout: float, while_up: bool = False) -> bool:
        """Wait until everything queued has been sent (True) or `timeout` seconds pass; with
        `while_up`, give up as soon as the store is found not answering."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while self._queue or self._spilled or self._sending is not None:
                left = deadline - time.monotonic()
                if left <= 0 or not self._thread.is_alive() or (
                        while_up and self._down_since is not None):
                    return False
                self._lock.wait(left)
        return True

    def close(self, timeout: float) -> Path | None:
        """Send what is queued within `timeout` seconds, then stop; what is left is written to
        the spool (its directory is returned), or dropped with a warning without a spool."""
        sent = self.drain(timeout)
        with self._lock:
            self._closing = True
            self._lock.notify_all()
            left = ([self._sending] if self._sending is not None else []) + list(self._queue)
            self._queue.clear()
        if sent or (not left and not self._spilled):
            if self.spool is not None and self.spool.directory.exists() and \
                    not self.spool.files():
                self.spool.directory.rmdir()  # spilled for a while, all sent since
            return None
        if self.spool is None:
            log.warning("MLflow: %d operations for run %s could not be sent", len(left),
                        self.run_id)
            return None
        if left:
            # In front of what was spilled earlier, which is newer.
            path = self.spool.write(left)
            path.rename(path.with_name("0" + path.name))
        return self.spool.directory

    def _next(self) -> Op | None:
        with self._lock:
            while not self._closing:
                if not self._queue and self._spilled:
                    self._load_spilled()
                if self._queue:
                    self._sending = self._take()
                    return self._sending
                self._lock.wait()
            return None

    def _take(self) -> Op:
        """The next operation; consecutive metrics operations are merged into one request of at
        most one log_batch (a server catching up after an outage gets few large requests, not
        one per logging point)."""
        op = self._queue.popleft()
        if op[0] != "metrics":
            return op
        values = list(op[1])
        while (self._queue and self._queue[0][0] == "metrics"
               and len(values) + len(self._queue[0][1]) <= BATCH["metrics"]):
            values += self._queue.popleft()[1]
        return ("metrics", values)

    def _load_spilled(self) -> None:
        ops = self.spool.take_oldest()
        self._spilled = bool(self.spool.files())
        self._queue.extend(ops)
        self._values += sum(map(size, ops))

    def _run(self) -> None:
        while (op := self._next()) is not None:
            self._send_until_done(op)
            with self._lock:
                if self._sending is op:
                    self._sending = None
                    self._values -= size(op)
                self._lock.notify_all()
        if self.writer is not None:
            self.writer.close()

    def _send_until_done(self, op: Op) -> None:
        tries = 0
        while True:
            try:
                send(self.client, self.run_id, op, self.writer)
                break
            except Exception as err:
                if permanent(err):
                    log.warning("MLflow refused %s for run %s (not retried): %s", op[0],
                                self.run_id, str(err).splitlines()[0])
                    break
                if self._down_since is None:
                    with self._lock:
                        self._down_since = time.monotonic()
                        self._lock.notify_all()  # `drain(while_up=True)` stops waiting
                    log.warning("MLflow store does not answer (%s); training goes on, what it "
                                "logs is kept and retried in the background",
                                str(err).splitlines()[0][:200])
            with self._lock:
                if self._closing:
                    return
                self._lock.wait(BACKOFF_S[min(tries, len(BACKOFF_S) - 1)])
                if self._closing:
                    return
            tries += 1
        if self._down_since is not None:
            log.warning("MLflow store answers again after %.0f s; sending what was kept",
                        time.monotonic() - self._down_since)
            self._down_since = None


def encode_metrics(metrics: dict[str, Any], step: int, timestamp_ms: int) -> list[list]:
    """[[key, value, timestamp_ms, step], ...] for a metrics operation."""
    return [[key, float(value), timestamp_ms, step] for key, value in metrics.items()]
