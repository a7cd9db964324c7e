"""Experiment tracking: an MLflow run on the process that owns the job, a null tracker elsewhere.

mlflow is imported only here and only when a run is really opened, so dry runs stay fast.
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path
from typing import Any

MAX_PARAMS_PER_BATCH = 100  # MLflow's log_batch limit
FLUSH_EVERY = 500  # buffered metric values before a log_batch round-trip
SERVER_TIMEOUT_S = 10  # an http tracking URI that does not answer in this time is reported
RETRIES = 5  # sqlite "database is locked" while other jobs write: retried with a backoff


# What MLflow's tracking stores accept (database URIs may name a driver: postgresql+psycopg2).
TRACKING_SCHEMES = ("http", "https", "file", "sqlite", "postgresql", "mysql", "mssql",
                    "databricks")


def check_scheme(uri: str) -> None:
    """A tracking URI MLflow has no store for is a ConfigError (a bare path is a file store)."""
    from urllib.parse import urlparse

    from stepwise.errors import ConfigError

    scheme = urlparse(uri).scheme
    if scheme and scheme.split("+")[0] not in TRACKING_SCHEMES:
        raise ConfigError("logger.tracking_uri", uri, f"MLflow has no tracking store for "
                          f"{scheme}://", "use http(s)://host:port for a server, "
                          "sqlite:///path/mlflow.db, or leave it null for ./mlflow.db")


def check_reachable(uri: str) -> None:
    """Fail fast (ConfigError within SERVER_TIMEOUT_S) if an http(s) tracking server is not up,
    instead of MLflow's minutes of retries."""
    if not uri.startswith(("http://", "https://")):
        return
    import urllib.error
    import urllib.request

    from stepwise.errors import ConfigError

    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=SERVER_TIMEOUT_S) as resp:
            resp.read()
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise ConfigError("logger.tracking_uri", uri, f"no MLflow server answers there ({reason})",
                          "start it (mlflow server --host 127.0.0.1 --port 5000), fix the URI, "
                          "or leave logger.tracking_uri null for the sqlite file") from None


@contextlib.contextmanager
def store_lock(uri: str):
    """Serialise the creation of a sqlite store (its schema migration is not safe to run from
    several jobs at once); a no-op for other stores."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    import fcntl

    path = Path(uri[len("sqlite:///"):])
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{path}.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def retrying(call, *args, **kwargs):
    """Call an MLflow client method, retrying while another process holds the sqlite lock."""
    for attempt in range(RETRIES):
        try:
            return call(*args, **kwargs)
        except Exception as err:
            if "locked" not in str(err) or attempt == RETRIES - 1:
                raise
            time.sleep(0.2 * 2 ** attempt)


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
    resumed = False

    def log_params(self, params: dict[str, Any]) -> None: ...
    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...
    def log_artifact(self, path: str | os.PathLike) -> None: ...
    def log_model(self, module: Any, example: Any, **options: Any) -> str | None: ...
    def flush(self) -> None: ...
    def finish(self, status: str) -> None: ...


class MlflowTracker:
    """One MLflow run per job; metrics are buffered and sent with `log_batch`.

    Args:
        tracking_uri: where the store is (sqlite file, directory or http server).
        experiment_name: created if it does not exist.
        run_name: shown in the UI; MLflow picks one when None.
        tags: set on the run when it is created.
        run_id: continue this existing run (a resume, or a spawned rank 0 logging into the run
            its launching process owns): it is set RUNNING again, and metric values already
            logged at a step are not logged again. If the store does not know it, a new run is
            created.
    """

    def __init__(self, tracking_uri: str, experiment_name: str, run_name: str | None = None,
                 tags: dict[str, str] | None = None, run_id: str | None = None) -> None:
        from mlflow.tracking import MlflowClient

        check_scheme(tracking_uri)
        check_reachable(tracking_uri)
        with store_lock(tracking_uri):
            self.client = MlflowClient(tracking_uri)
            self.client.search_experiments(max_results=1)  # creates the store's tables once
        self.tracking_uri = tracking_uri
        self._pending: list[Any] = []
        self._logged_up_to: dict[str, int] = {}
        self.resumed = run_id is not None and self._reopen(run_id)
        if self.resumed:
            self.run_id = run_id
            return
        experiment_id = self._experiment_id(experiment_name)
        self.run_id = self.client.create_run(experiment_id, run_name=run_name,
                                             tags=tags or {}).info.run_id

    def _reopen(self, run_id: str) -> bool:
        try:
            run = self.client.get_run(run_id)
        except Exception:
            return False
        for key in run.data.metrics:
            steps = [m.step for m in self.client.get_metric_history(run_id, key)]
            self._logged_up_to[key] = max(steps, default=-1)
        if run.info.status != "RUNNING":
            self.client.update_run(run_id, status="RUNNING")
        return True

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
            retrying(self.client.log_batch, self.run_id, params=items[i:i + MAX_PARAMS_PER_BATCH])

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._pending += [Metric(key, float(value), now, step) for key, value in metrics.items()
                          if step > self._logged_up_to.get(key, -1)]
        if len(self._pending) >= FLUSH_EVERY:
            self.flush()

    def flush(self) -> None:
        while self._pending:
            batch, self._pending = self._pending[:1000], self._pending[1000:]
            retrying(self.client.log_batch, self.run_id, metrics=batch)

    def log_artifact(self, path: str | os.PathLike) -> None:
        retrying(self.client.log_artifact, self.run_id, str(path))

    def log_model(self, module: Any, example: Any, **options: Any) -> str:
        """Log `module` as an MLflow PyTorch model of the run (stepwise.model_log.log_model takes
        `options`); the metrics logged so far are sent first, to be linked to it."""
        from stepwise.model_log import log_model

        self.flush()
        return log_model(self.tracking_uri, self.run_id, module, example, **options)

    def finish(self, status: str) -> None:
        """Flush and close the run as FINISHED, FAILED or KILLED."""
        try:
            self.flush()
        finally:
            retrying(self.client.set_terminated, self.run_id, status=status)


def scalars(name: str, value: Any) -> dict[str, float]:
    """A metric's value as MLflow metrics: `name` for a scalar, `name/<i>` per element else."""
    import torch

    value = torch.as_tensor(value).detach().double().cpu()
    if value.numel() == 1:
        return {name: value.item()}
    return {f"{name}/{i}": v for i, v in enumerate(value.flatten().tolist())}
