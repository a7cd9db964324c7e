"""Experiment tracking: an MLflow run on the process that owns the job, a null tracker elsewhere.

mlflow is imported only here and only when a run is really opened, so dry runs stay fast.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

MAX_PARAMS_PER_BATCH = 100  # MLflow's log_batch limit
FLUSH_EVERY = 500  # buffered metric values before a log_batch round-trip


def default_tracking_uri(configured: str | None, start_dir: str | os.PathLike) -> str:
    """`logger.tracking_uri`, else $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in `start_dir`."""
    if configured:
        return configured
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{Path(start_dir).resolve() / 'mlflow.db'}"


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """{'trainer': {'max_epochs': 3}} -> {'trainer.max_epochs': 3}; lists stay whole values."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        flat.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


class NullTracker:
    """Does nothing: ranks other than 0, `logger=none`, dry runs."""

    run_id: str | None = None

    def log_params(self, params: dict[str, Any]) -> None: ...
    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...
    def log_artifact(self, path: str | os.PathLike) -> None: ...
    def flush(self) -> None: ...
    def finish(self, status: str) -> None: ...


class MlflowTracker:
    """One MLflow run per job; metrics are buffered and sent with `log_batch`.

    Args:
        tracking_uri: where the store is (sqlite file, directory or http server).
        experiment_name: created if it does not exist.
        run_name: shown in the UI; MLflow picks one when None.
        tags: set on the run when it is created.
        run_id: attach to this existing run instead of creating one (a spawned rank 0 logging
            into the run that its launching process owns).
    """

    def __init__(self, tracking_uri: str, experiment_name: str, run_name: str | None = None,
                 tags: dict[str, str] | None = None, run_id: str | None = None) -> None:
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri)
        if run_id is None:
            experiment_id = self._experiment_id(experiment_name)
            run_id = self.client.create_run(experiment_id, run_name=run_name,
                                            tags=tags or {}).info.run_id
        self.run_id = run_id
        self.tracking_uri = tracking_uri
        self._pending: list[Any] = []

    def _experiment_id(self, name: str) -> str:
        experiment = self.client.get_experiment_by_name(name)
        if experiment is not None:
            return experiment.experiment_id
        try:
            return self.client.create_experiment(name)
        except Exception:  # another job of the same sweep created it first
            return self.client.get_experiment_by_name(name).experiment_id

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(key, str(value)) for key, value in params.items()]
        for i in range(0, len(items), MAX_PARAMS_PER_BATCH):
            self.client.log_batch(self.run_id, params=items[i:i + MAX_PARAMS_PER_BATCH])

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._pending += [Metric(key, float(value), now, step) for key, value in metrics.items()]
        if len(self._pending) >= FLUSH_EVERY:
            self.flush()

    def flush(self) -> None:
        while self._pending:
            batch, self._pending = self._pending[:1000], self._pending[1000:]
            self.client.log_batch(self.run_id, metrics=batch)

    def log_artifact(self, path: str | os.PathLike) -> None:
        self.client.log_artifact(self.run_id, str(path))

    def finish(self, status: str) -> None:
        """Flush and close the run as FINISHED, FAILED or KILLED."""
        try:
            self.flush()
        finally:
            self.client.set_terminated(self.run_id, status=status)
