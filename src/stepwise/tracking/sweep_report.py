"""The comparison a sweep's parent run ends with: a CSV row and a loss curve per child run.

Read back from the tracking store (MlflowClient), so it covers children that ran in other
processes or on other machines. Curves are drawn against `train/samples_seen`, the x axis on
which runs that factor the same effective batch differently are comparable.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

CSV_NAME = "sweep_summary.csv"
PNG_NAME = "sweep_losses.png"
COLUMNS = ("job_num", "overrides", "status", "effective_batch_size", "accum", "world_size",
           "per_device_batch_size", "lr", "global_step", "samples_seen", "val/loss", "val/accuracy",
           "train/loss", "wall_time_s", "run_id")
CURVES = ("train/loss", "val/loss")


def children(client, parent_run_id: str) -> list[Any]:
    """The parent's child runs, in job order."""
    parent = client.get_run(parent_run_id)
    runs = client.search_runs([parent.info.experiment_id],
                              filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'",
                              max_results=10_000)
    return sorted(runs, key=lambda run: int(run.data.tags.get("stepwise.job_num", "0")))


def _count(value: float | None) -> int | None:
    return None if value is None else int(value)


def summary_row(run) -> dict[str, Any]:
    params, metrics, info = run.data.params, run.data.metrics, run.info
    wall = (info.end_time - info.start_time) / 1000 if info.end_time else None
    row = {"job_num": run.data.tags.get("stepwise.job_num"),
           "overrides": run.data.tags.get("stepwise.overrides", ""), "status": info.status,
           "global_step": _count(metrics.get("global_step")),
           "samples_seen": _count(metrics.get("train/samples_seen")),
           "wall_time_s": None if wall is None else round(wall, 3), "run_id": info.run_id}
    for key in ("effective_batch_size", "accum", "world_size", "per_device_batch_size", "lr"):
        row[key] = params.get(key)
    for key in ("val/loss", "val/accuracy", "train/loss"):
        row[key] = metrics.get(key)
    row.update({key: value for key, value in metrics.items() if key.startswith(("test/", "best/"))})
    return row


def write_csv(runs, path: Path, best_run_id: str | None = None) -> None:
    """One row per child; its `test/*` columns when the children were tested, with
    `trainer.monitor` its best evaluation's `best/*` columns too, and `best_child` marks the
    sweep's best run."""
    def keys(prefix: str) -> list[str]:
        return sorted({key for run in runs for key in run.data.metrics if key.startswith(prefix)})

    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=[*COLUMNS, *keys("test/"), *keys("best/"),
                                                    "best_child"])
        writer.writeheader()
        for run in runs:
            writer.writerow({**summary_row(run), "best_child": run.info.run_id == best_run_id})


def curve(client, run_id: str, key: str) -> tuple[list[float], list[float]]:
    """(samples seen, value) for each logged value of `key`, matched by optimizer step."""
    samples = {m.step: m.value for m in client.get_metric_history(run_id, "train/samples_seen")}
    points = sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))
    matched = [(samples[step], value) for step, value in points if step in samples]
    return [x for x, _ in matched], [y for _, y in matched]


def distinct_overrides(runs) -> list[str]:
    """Each run's overrides less those every run shares: what tells the lines apart."""
    sets = [run.data.tags.get("stepwise.overrides", "").split() for run in runs]
    common = set.intersection(*map(set, sets)) if sets else set()
    return [" ".join(o for o in overrides if o not in common) or run.info.run_name
            for overrides, run in zip(sets, runs)]


def plot(client, runs, path: Path) -> None:
    """One panel per loss against samples seen, one line per child (labelled with its
    overrides) through every logged point; validation points are marked."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    labels = distinct_overrides(runs)
    fig, axes = plt.subplots(1, len(CURVES), figsize=(11, 4), constrained_layout=True)
    for axis, key in zip(axes, CURVES):
        for run, label in zip(runs, labels):
            xs, ys = curve(client, run.info.run_id, key)
            marked = key.startswith("val/") or len(xs) < 30
            axis.plot(xs, ys, marker="o" if marked else None, markersize=4, label=label)
        axis.set(title=key, xlabel="samples seen", ylabel=key)
        axis.grid(alpha=0.3)
    if runs:
        axes[0].legend(fontsize=8)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def close_parent(tracking_uri: str, parent_run_id: str, sweep_dir: Path,
                 direction: str | None = None) -> str:
    """Write the summary and plot into `sweep_dir`, attach them to the parent run with its best
    child (stepwise.tracking.best_child; `direction`: the sweeper's, min or max), and end it: FINISHED
    when every child finished, FAILED otherwise. Returns the status."""
    from mlflow.tracking import MlflowClient

    from stepwise.tracking.best_child import carry_best_child
    from stepwise.tracking.tracker import retrying

    client = MlflowClient(tracking_uri)
    runs = children(client, parent_run_id)
    best = carry_best_child(client, parent_run_id, runs, direction) if runs else None
    write_csv(runs, sweep_dir / CSV_NAME, best)
    plot(client, runs, sweep_dir / PNG_NAME)
    for name in (CSV_NAME, PNG_NAME):
        retrying(client.log_artifact, parent_run_id, str(sweep_dir / name))
    retrying(client.log_metric, parent_run_id, "sweep/children", len(runs))
    ok = bool(runs) and all(run.info.status == "FINISHED" for run in runs)
    status = "FINISHED" if ok else "FAILED"
    retrying(client.set_terminated, parent_run_id, status)
    return status
