"""The outbox: bounded memory while the store does not answer, a spool on disk, and its replay
into a real sqlite store, the final status last."""

from __future__ import annotations

from mlflow.tracking import MlflowClient

from stepwise.tracking import outbox as outbox_module
from stepwise.tracking.outbox import Outbox, permanent, read_ops
from stepwise.tracking.replay import main as replay_main
from tests.ports import free_port


def _store(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("outbox")).info.run_id
    return uri, client, run_id


def test_a_store_that_never_answers_spills_past_the_bound_and_the_replay_sends_it_all(
        tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setattr(outbox_module, "SEGMENT_VALUES", 40)
    uri, client, run_id = _store(tmp_path)
    nowhere = MlflowClient(f"http://127.0.0.1:{free_port()}")  # nothing listens there
    run_dir = tmp_path / "run"
    box = Outbox(nowhere, run_id, uri, run_dir / "mlflow_unsent", max_values=50)
    box.put(("params", {"lr": "0.1"}))
    for step in range(1, 201):
        box.put(("metrics", [["train/loss", 1.0 / step, 1_000 + step, step]]))
        assert box._values <= 50  # the memory bound holds whatever the store does
    box.put(("terminate", "FINISHED", 5_000))
    spool = box.close(timeout=0.5)
    assert spool == run_dir / "mlflow_unsent"
    files = sorted(spool.glob("*.jsonl"))
    assert len(files) >= 4  # the memory's share first, then files of at most 40 values
    ops = [op for path in files for op in read_ops(path)[1]]
    assert sum(len(op[1]) for op in ops if op[0] == "metrics") == 200
    assert client.get_run(run_id).info.status == "RUNNING"

    assert replay_main([str(run_dir)]) == 0
    history = client.get_metric_history(run_id, "train/loss")
    assert sorted(m.step for m in history) == list(range(1, 201))
    assert {m.step: m.timestamp for m in history}[7] == 1_007  # the time it was logged
    run = client.get_run(run_id)
    assert (run.info.status, run.info.end_time, run.data.params["lr"]) == ("FINISHED", 5_000, "0.1")
    assert not list(spool.glob("*.jsonl"))
    assert replay_main([str(run_dir)]) == 2  # nothing left to send


def test_a_store_that_answers_gets_everything_in_order_and_nothing_is_spooled(tmp_path):
    uri, client, run_id = _store(tmp_path)
    box = Outbox(client, run_id, uri, tmp_path / "run" / "mlflow_unsent", max_values=50)
    for step in range(1, 101):
        box.put(("metrics", [["train/loss", float(step), 0, step]]))
    box.put(("tags", {"stepwise.note": "x"}))
    box.put(("terminate", "KILLED", 9_000))
    assert box.close(timeout=60) is None
    assert len(client.get_metric_history(run_id, "train/loss")) == 100
    run = client.get_run(run_id)
    assert (run.info.status, run.data.tags["stepwise.note"]) == ("KILLED", "x")
    assert not (tmp_path / "run" / "mlflow_unsent").exists()


def test_a_refused_value_is_dropped_not_retried(tmp_path):
    """A 4xx (here: a param changed after it was logged) cannot be mended by retrying: the
    outbox warns and goes on with the next operation."""
    uri, client, run_id = _store(tmp_path)
    client.log_param(run_id, "lr", "0.1")
    try:
        client.log_param(run_id, "lr", "0.2")
    except Exception as err:
        assert permanent(err)
    box = Outbox(client, run_id, uri, None)
    box.put(("params", {"lr": "0.3"}))
    box.put(("metrics", [["after", 1.0, 0, 1]]))
    assert box.close(timeout=60) is None
    assert client.get_run(run_id).data.metrics["after"] == 1.0


def test_system_metrics_every_interval_and_none_at_zero(tmp_path):
    """An interval of 0 starts no sampling thread (it would sample without pause and flood the
    store, as a benchmark once did); a positive one samples until the run ends."""
    import threading

    from stepwise.tracking.tracker import MlflowTracker

    def sampling() -> bool:
        return any(t.name == "stepwise-system-metrics" for t in threading.enumerate())

    counts = {}
    for interval in (0, 0.05):
        uri = f"sqlite:///{tmp_path / f'{interval}.db'}"
        tracker = MlflowTracker(uri, "system", spool_dir=tmp_path / str(interval))
        tracker.start_system_metrics(interval)
        assert sampling() == (interval > 0)
        tracker.close("FINISHED")
        assert not sampling()
        history = MlflowClient(uri).get_metric_history(tracker.run_id,
                                                       "system/cpu_utilization_percentage")
        counts[interval] = len(history)
    assert counts[0] == 0 and counts[0.05] >= 1
