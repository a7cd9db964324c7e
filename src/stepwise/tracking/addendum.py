"""What `stepwise eval` and `stepwise predict` add to a run that has ended: metrics, tags and
artifacts, written synchronously with MLflow's client. The run is not reopened: its status, start
and end times, params and other metrics stay as training left them.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from stepwise.contract.errors import ConfigError
from stepwise.tracking.tracker import check_scheme, retrying

RUN_DIR_TAG = "stepwise.run_dir"  # set by run/runner.py on every run


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    check_scheme(uri)
    return MlflowClient(uri)


def store_exists(uri: str) -> bool:
    """False for a sqlite file that is not there (MLflow's client would create an empty one)."""
    return not uri.startswith("sqlite:///") or Path(uri[len("sqlite:///"):]).is_file()


def find_run(uri: str, run_id: str) -> dict[str, Any] | None:
    """The run's status and tags ({"status": ..., "tags": {...}}), or None when `uri` has no
    such run."""
    if not store_exists(uri):
        return None
    try:
        run = retrying(_client(uri).get_run, run_id)
    except Exception:  # MlflowException: RESOURCE_DOES_NOT_EXIST, or a malformed id
        return None
    return {"status": run.info.status, "tags": dict(run.data.tags)}


def add_to_run(uri: str, run_id: str, *, metrics: dict[str, float] | None = None, step: int = 0,
               tags: dict[str, str] | None = None,
               artifacts: list[tuple[str | os.PathLike, str | None]] = ()) -> None:
    """Log `metrics` at `step`, set `tags` and upload `artifacts` ((file, artifact dir)) into
    the run, leaving everything else of it as it is."""
    import time

    from mlflow.entities import Metric, RunTag

    client = _client(uri)
    if find_run(uri, run_id) is None:
        raise ConfigError("run", run_id, f"no such MLflow run in {uri}",
                          "give logger.tracking_uri=<the store the run is in>")
    now = int(time.time() * 1000)
    retrying(client.log_batch, run_id,
             metrics=[Metric(key, float(value), now, step) for key, value in (metrics or {}).items()],
             tags=[RunTag(key, str(value)) for key, value in (tags or {}).items()])
    for path, artifact_path in artifacts:
        retrying(client.log_artifact, run_id, str(path), artifact_path)
