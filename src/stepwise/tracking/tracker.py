"""Experiment tracking: an MLflow run on the process that owns the job, a null tracker elsewhere.

mlflow is imported only here and only when a run is really opened, so dry runs stay fast.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from stepwise.tracking.models import Logged

log = logging.getLogger(__name__)

FLUSH_EVERY = 500  # buffered metric values handed to the outbox at once
FLUSH_TIMEOUT_S = 60.0  # at the end, how long to wait for the store before spooling the rest
SERVER_TIMEOUT_S = 10  # an http tracking URI that does not answer in this time is reported
RETRIES = 5  # sqlite "database is locked" while other jobs write: retried with a backoff


# What MLflow's tracking stores accept (database URIs may name a driver: postgresql+psycopg2).
TRACKING_SCHEMES = ("http", "https", "file", "sqlite", "postgresql", "mysql", "mssql",
                    "databricks")


def check_scheme(uri: str) -> None:
    """A tracking URI MLflow has no store for is a ConfigError (a bare path is a file store)."""
    from urllib.parse import urlparse

    from stepwise.contract.errors import ConfigError

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

    from stepwise.contract.errors import ConfigError

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
    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None: ...
    def set_tags(self, tags: dict[str, Any]) -> None: ...
    def start_system_metrics(self, interval_s: float) -> None: ...
    def log_model(self, module: Any, example: Any, **options: Any) -> Logged | None: ...
    def flush(self) -> None: ...
    def sync_while_up(self) -> bool: ...
    def close(self, status: str | None = None) -> None: ...
    def finish(self, status: str) -> None: ...


class MlflowTracker:
    """One MLflow run per job. The run is created (or reopened) here, synchronously; everything
    logged afterwards goes through an `Outbox` and is sent by a background thread, so that a
    slow or absent tracking server never holds training up (DESIGN section 6).

    Args:
        tracking_uri: where the store is (sqlite file, directory or http server).
        experiment_name: created if it does not exist (its artifacts beside a sqlite store).
        run_name: shown in the UI.
        tags: set on the run when it is created.
        run_id: continue this existing run (a resume, or a spawned rank 0 logging into the run
            its launching process owns): it is set RUNNING again, and metric values already
            logged at a step are not logged again. If the store does not know it, a new run is
            created.
        spool_dir: where what could not be sent is kept (the run dir's `mlflow_unsent/`).
        flush_timeout_s: how long `close` waits for the store before spooling what is left.
    """

    def __init__(self, tracking_uri: str, experiment_name: str, run_name: str | None = None,
                 tags: dict[str, str] | None = None, run_id: str | None = None,
                 spool_dir: Path | None = None, flush_timeout_s: float = FLUSH_TIMEOUT_S) -> None:
        from mlflow.tracking import MlflowClient

        from stepwise.tracking.outbox import Outbox

        check_scheme(tracking_uri)
        check_reachable(tracking_uri)
        if tracking_uri.startswith(("http://", "https://")):
            # The outbox retries (in the background); MLflow's own retries would hold one
            # request for minutes, and the end of the job with it.
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(SERVER_TIMEOUT_S * 3))
        with store_lock(tracking_uri):
            self.client = MlflowClient(tracking_uri)
            self.client.search_experiments(max_results=1)  # creates the store's tables once
        self.tracking_uri, self.flush_timeout_s = tracking_uri, flush_timeout_s
        self._pending: list[list] = []
        self._logged_up_to: dict[str, int] = {}
        self._monitor = None
        self.resumed = run_id is not None and self._reopen(run_id)
        if self.resumed:
            self.run_id = run_id
        else:
            run = retrying(self.client.create_run, self._experiment_id(experiment_name),
                           run_name=run_name, tags=tags or {})
            self.run_id, self.experiment_id = run.info.run_id, run.info.experiment_id
        self.outbox = Outbox(self.client, self.run_id, tracking_uri, spool_dir)

    def _reopen(self, run_id: str) -> bool:
        try:
            run = self.client.get_run(run_id)
        except Exception:
            return False
        self.experiment_id = run.info.experiment_id
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
            return self.client.create_experiment(name, artifact_location=artifact_location(
                self.tracking_uri, name))
        except Exception:  # another job of the same sweep created it first
            return self.client.get_experiment_by_name(name).experiment_id

    def log_params(self, params: dict[str, Any]) -> None:
        self.outbox.put(("params", {key: str(value) for key, value in params.items()}))

    def set_tags(self, tags: dict[str, Any]) -> None:
        self.outbox.put(("tags", {key: str(value) for key, value in tags.items()}))

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        self._pending += [[key, float(value), now, step] for key, value in metrics.items()
                          if step > self._logged_up_to.get(key, -1)]
        if len(self._pending) >= FLUSH_EVERY:
            self.flush()

    def flush(self) -> None:
        """Hand the buffered metric values to the outbox (no wait for the store)."""
        if self._pending:
            self.outbox.put(("metrics", self._pending))
            self._pending = []

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        self.outbox.put(("artifact", str(path), artifact_path))

    def start_system_metrics(self, interval_s: float) -> None:
        """CPU, memory, disk, network (and GPU when one is present) as `system/*` metrics, every
        `interval_s` seconds until `close` (MLflow's own monitors; stepwise/tracking/system_metrics.py);
        none when `interval_s` is 0."""
        if interval_s <= 0:
            return
        from stepwise.tracking.system_metrics import SystemMetrics

        first = 1 + max((step for key, step in self._logged_up_to.items()
                         if key.startswith("system/")), default=-1)  # a resumed run goes on
        self._monitor = SystemMetrics(self.outbox, interval_s, first)
        self._monitor.start()

    def sync(self, timeout: float | None = None) -> bool:
        """Wait until everything logged so far has been sent (True), or `timeout` seconds."""
        self.flush()
        return self.outbox.drain(self.flush_timeout_s if timeout is None else timeout)

    def sync_while_up(self) -> bool:
        """Wait until everything logged so far is sent, unless the store is not answering (then
        return at once: training does not wait for a server that is down)."""
        self.flush()
        return self.outbox.drain(self.flush_timeout_s, while_up=True)

    def close(self, status: str | None = None) -> None:
        """Send what is left (and the run's final status, when given) within `flush_timeout_s`;
        what the store did not take by then is written to the spool, for `stepwise.tracking.replay`."""
        if self._monitor is not None:
            self._monitor.stop()
            self._monitor = None
        self.flush()
        if status is not None:
            self.outbox.put(("terminate", status, int(time.time() * 1000)))
        spooled = self.outbox.close(self.flush_timeout_s)
        if spooled is not None:
            log.warning("MLflow: %s did not take everything within %.0f s (logger.flush_timeout_s);"
                        " the rest is kept in %s; send it with: python -m stepwise.tracking.replay %s",
                        self.tracking_uri, self.flush_timeout_s, spooled, spooled.parent)

    def log_model(self, module: Any, example: Any, **options: Any) -> Logged:
        """Log `module` as an MLflow PyTorch model of the run (stepwise.tracking.models.log_model takes
        `options`; its URI and form come back); the metrics logged so far are sent first (within
        `flush_timeout_s`), to be linked to it. Synchronous: it runs once training is over."""
        from stepwise.tracking.models import log_model

        self.sync()
        return log_model(self.tracking_uri, self.run_id, module, example, **options)

    def finish(self, status: str) -> None:
        """Close the run as FINISHED, FAILED or KILLED."""
        self.close(status)

    def ui_link(self) -> str:
        """The run in the MLflow UI: the server's own address, or `mlflow ui`'s default one.
        MLflow 3 opens on its GenAI pages, where training runs are not listed: the link asks
        for the model-training view."""
        base = (self.tracking_uri.rstrip("/") if self.tracking_uri.startswith(("http://", "https://"))
                else "http://127.0.0.1:5000")
        return (f"{base}/#/experiments/{self.experiment_id}/runs/{self.run_id}"
                "?workflowType=machine_learning")


def artifact_location(tracking_uri: str, experiment_name: str) -> str | None:
    """Beside a sqlite store (`<its dir>/mlartifacts/<experiment>`), instead of MLflow's default,
    `./mlruns` of whatever directory the command was started from; other stores decide."""
    if not tracking_uri.startswith("sqlite:///"):
        return None
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", experiment_name).strip("_") or "experiment"
    return (Path(tracking_uri[len("sqlite:///"):]).parent / "mlartifacts" / slug).as_uri()
