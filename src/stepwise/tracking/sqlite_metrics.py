"""Metric values written straight into the tables of a sqlite MLflow store (stepwise's default).

Not MLflow's client here, on purpose: its `log_batch` builds, validates and flushes one ORM
object per value, about 100 us of CPU each on the CI machine (500 values: 61 ms, against 6 ms
here), and it does so in the training process, under its GIL, while the training thread waits
for it. With a run's ~100 logged steps of 4-8 values each, that was 2-3% of a 2 s benchmark run
(W1 in benchmarks/overhead.py). What is written is what MLflow writes, row for row:

- `metrics`: one row per value; NaN as value 0 with is_nan, +-inf as +-max float (MLflow's
  `sanitize_metric_value`); a row already there is skipped (MLflow's log_batch drops such
  duplicates too);
- `latest_metrics`: per key, the value with the largest (step, timestamp, value), as MLflow's
  `_update_latest_metrics_if_necessary` keeps it.

tests/unit/test_sqlite_metrics.py logs the same values both ways and compares what MlflowClient
reads back. A store whose tables do not have these columns (another MLflow schema) gets no
writer, and everything goes through MLflow's client as before; so does everything that is not a
metric value (params, tags, artifacts, the status).
"""

from __future__ import annotations

import math
import sqlite3
from pathlib import Path

COLUMNS = {"metrics": {"key", "value", "timestamp", "run_uuid", "step", "is_nan"},
           "latest_metrics": {"key", "value", "timestamp", "step", "is_nan", "run_uuid"}}
MAX_FLOAT = 1.7976931348623157e308
INSERT = ("INSERT OR IGNORE INTO metrics (key, value, timestamp, run_uuid, step, is_nan) "
          "VALUES (?, ?, ?, ?, ?, ?)")
LATEST = ("INSERT INTO latest_metrics (key, value, timestamp, step, is_nan, run_uuid) "
          "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (key, run_uuid) DO UPDATE SET "
          "value = excluded.value, timestamp = excluded.timestamp, step = excluded.step, "
          "is_nan = excluded.is_nan WHERE (excluded.step, excluded.timestamp, excluded.value) "
          "> (latest_metrics.step, latest_metrics.timestamp, latest_metrics.value)")


def sanitized(value: float) -> tuple[float, int]:
    """(value, is_nan) as MLflow stores a metric value."""
    if math.isnan(value):
        return 0.0, 1
    if math.isinf(value):
        return (MAX_FLOAT if value > 0 else -MAX_FLOAT), 0
    return value, 0


class MetricWriter:
    """Writes metric values of a sqlite store's runs (one connection, opened by the thread that
    writes first; a busy store is waited for up to `timeout` seconds, then the write fails and
    the outbox retries it)."""

    def __init__(self, path: Path, timeout: float = 30.0) -> None:
        self.path, self.timeout = path, timeout
        self._connection: sqlite3.Connection | None = None
        self._valid_keys: set[str] = set()

    def log(self, run_id: str, values: list[list]) -> None:
        """Write `[[key, value, timestamp_ms, step], ...]` in one transaction. A key MLflow
        would refuse raises MLflow's own error (a 400: the outbox drops it, not retried)."""
        rows, latest = [], {}
        for key, value, timestamp, step in values:
            if key not in self._valid_keys:
                from mlflow.utils.validation import _validate_metric_name

                _validate_metric_name(key)
                self._valid_keys.add(key)
            value, is_nan = sanitized(float(value))
            rows.append((key, value, int(timestamp), run_id, int(step), is_nan))
            order = (int(step), int(timestamp), value)
            if key not in latest or order > latest[key][0]:
                latest[key] = (order, is_nan)
        connection = self._connect()
        with connection:  # one transaction: committed, or rolled back on an error
            connection.executemany(INSERT, rows)
            connection.executemany(LATEST, [(key, value, timestamp, step, is_nan, run_id)
                                            for key, ((step, timestamp, value), is_nan)
                                            in latest.items()])

    def _connect(self) -> sqlite3.Connection:
        if self._connection is None:
            self._connection = sqlite3.connect(self.path, timeout=self.timeout,
                                               check_same_thread=False)
        return self._connection

    def close(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None


def open_writer(tracking_uri: str) -> MetricWriter | None:
    """A writer for a `sqlite:///` store whose tables have the columns written here, else None
    (MLflow's client then writes the metrics)."""
    if not tracking_uri.startswith("sqlite:///"):
        return None
    path = Path(tracking_uri[len("sqlite:///"):])
    try:
        connection = sqlite3.connect(f"{path.as_uri()}?mode=rw", uri=True, timeout=30.0)
    except sqlite3.Error:
        return None
    try:
        for table, needed in COLUMNS.items():
            found = {row[1] for row in connection.execute(f"PRAGMA table_info({table})")}
            if found != needed:
                return None
    except sqlite3.Error:
        return None
    finally:
        connection.close()
    return MetricWriter(path)
