"""Metric values written straight into a sqlite store read back exactly as MLflow's own
log_batch writes them (histories and latest values), and a store of another schema gets no
writer."""

from __future__ import annotations

import math
import sqlite3

import pytest
from mlflow.entities import Metric
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from stepwise.tracking.outbox import permanent
from stepwise.tracking.sqlite_metrics import open_writer

# Batches as a run sends them, with what the latest value depends on: steps out of order, one
# step logged twice at different times, equal (step, timestamp) with different values, NaN and
# infinities, and a value sent twice (a retry after a lost answer).
BATCHES = [
    [["train/loss", 2.5, 1000, 1], ["train/lr", 0.1, 1000, 1], ["val/loss", math.nan, 1000, 1]],
    [["train/loss", 2.0, 1010, 3], ["train/loss", 2.2, 1005, 2], ["val/loss", 1.5, 1010, 3]],
    [["train/loss", 2.0, 1010, 3], ["train/loss", 1.9, 1001, 3], ["train/lr", math.inf, 1020, 4]],
    [["train/loss", 1.7, 1030, 3], ["train/loss", 1.8, 1030, 3], ["val/loss", -math.inf, 900, 5],
     ["train/lr", 0.05, 1020, 4], ["epoch", 1.0, 1040, 5]],
    [["val/loss", 1.2, 2000, 2], ["epoch", 1.0, 1040, 5]],
]


def _read(client: MlflowClient, run_id: str) -> tuple[dict, dict]:
    run = client.get_run(run_id)
    histories = {key: sorted((m.step, m.timestamp, m.value if not math.isnan(m.value) else "nan")
                             for m in client.get_metric_history(run_id, key))
                 for key in run.data.metrics}
    return histories, run.data.metrics


def test_the_same_values_read_back_as_mlflows_own_log_batch_writes_them(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("same")
    by_mlflow, by_writer = (client.create_run(experiment).info.run_id for _ in range(2))
    writer = open_writer(uri)
    assert writer is not None
    for batch in BATCHES:
        client.log_batch(by_mlflow, metrics=[Metric(k, v, t, s) for k, v, t, s in batch])
        writer.log(by_writer, batch)
    writer.close()
    expected_histories, expected_latest = _read(client, by_mlflow)
    histories, latest = _read(client, by_writer)
    assert histories == expected_histories
    assert latest.keys() == expected_latest.keys() == {"train/loss", "train/lr", "val/loss",
                                                       "epoch"}
    for key, value in expected_latest.items():
        assert latest[key] == value or (math.isnan(latest[key]) and math.isnan(value)), key
    assert (latest["train/loss"], latest["val/loss"]) == (1.8, -1.7976931348623157e308)
    assert len(histories["train/loss"]) == 6  # the repeated value once


def test_a_key_mlflow_refuses_is_refused_for_good(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("keys")).info.run_id
    writer = open_writer(uri)
    with pytest.raises(MlflowException) as refused:
        writer.log(run_id, [["../loss", 1.0, 1, 1]])
    assert permanent(refused.value)  # the outbox drops it instead of retrying
    writer.log(run_id, [["ok", 1.0, 1, 1]])
    assert client.get_run(run_id).data.metrics == {"ok": 1.0}


def test_another_schema_or_store_gets_no_writer(tmp_path):
    assert open_writer("http://127.0.0.1:5000") is None
    assert open_writer(f"sqlite:///{tmp_path / 'missing' / 'mlflow.db'}") is None
    other = tmp_path / "other.db"
    with sqlite3.connect(other) as connection:
        connection.execute("CREATE TABLE metrics (key TEXT, value REAL, timestamp INTEGER, "
                           "run_uuid TEXT, step INTEGER, is_nan INTEGER, model_id TEXT)")
        connection.execute("CREATE TABLE latest_metrics (key TEXT, value REAL, "
                           "timestamp INTEGER, step INTEGER, is_nan INTEGER, run_uuid TEXT)")
    assert open_writer(f"sqlite:///{other}") is None
