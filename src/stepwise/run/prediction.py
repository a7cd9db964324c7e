"""`stepwise predict`: the model's outputs for every sample of a split, one row per sample with
its index, in a Parquet file of the run directory (`pandas.read_parquet`), logged as an artifact
of the run.

Columns: `index` (the sample's position in the split), `target`; for classification
`predicted` (the argmax class) and `probability` (its softmax probability), and `logit_<c>` per
class when the output is one vector per sample; otherwise `output` (one value per sample) or
`output_<i>`. Values with more dimensions per sample (a language model's tokens) are list
columns, one flattened list per sample.

Parquet, through pyarrow, which MLflow requires (stepwise requires MLflow): typed columns, a
fraction of CSV's size, and the file's metadata says which checkpoint and data it holds.
Under `parallel=ddp` each rank writes its shard; rank 0 joins them in sample order, checking
that the indices are exactly 0..N-1, once each (the shards are disjoint by construction).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from stepwise.parallel.replica import Replica
from stepwise.run.offline import checkpoint_model, on_device, run, shard
from stepwise.run.selection import Selection

PREDICTIONS_DIR = "predictions"  # in the run directory, and the artifact directory in MLflow
TAG = "stepwise.predict.{name}"


def output_path(selection: Selection) -> Path:
    """`<run dir>/predictions/<name>-<checkpoint>-step<N>[-data<hash>].parquet` (name: the
    split, or `name=`): the hash of the data overrides when there are some and no name, so that
    predictions on other data do not overwrite the split's own."""
    name = f"{selection.name}-{selection.label}-step{selection.global_step}"
    overrides = selection.data_overrides
    if overrides and selection.args.name is None:
        name += "-data" + hashlib.sha1(" ".join(overrides).encode()).hexdigest()[:8]
    base = selection.run_dir if selection.run_dir is not None else selection.checkpoint.parent
    return base / PREDICTIONS_DIR / f"{name}.parquet"


def _columns(name: str, values: np.ndarray, spread: bool = False) -> dict[str, Any]:
    """One column per sample value; `<name>_<i>` columns for a vector when `spread`; else a
    list column of each sample's flattened values."""
    if values.ndim == 1:
        return {name: values}
    if values.ndim == 2 and values.shape[1] == 1:
        return {name: values[:, 0]}
    if spread and values.ndim == 2:
        return {f"{name}_{i}": values[:, i] for i in range(values.shape[1])}
    return {name: list(values.reshape(len(values), -1))}


def batch_columns(out: torch.Tensor, target: Any, indices: list[int],
                  classification: bool) -> dict[str, Any]:
    """The columns of one batch of outputs (see the module docstring)."""
    columns: dict[str, Any] = {"index": np.asarray(indices, dtype=np.int64)}
    if isinstance(target, torch.Tensor):
        columns.update(_columns("target", target.detach().cpu().numpy()))
    out = out.detach().float().cpu() if out.is_floating_point() else out.detach().cpu()
    if not classification:
        columns.update(_columns("output", out.numpy(), spread=True))
        return columns
    probability, predicted = torch.softmax(out, dim=1).max(dim=1)  # classes on dim 1, as the loss
    columns.update(_columns("predicted", predicted.numpy()))
    columns.update(_columns("probability", probability.numpy()))
    if out.dim() == 2:
        columns.update(_columns("logit", out.numpy(), spread=True))
    return columns


def _joined(chunks: list[dict[str, Any]]) -> dict[str, Any]:
    if not chunks:
        return {}
    columns = {}
    for name in chunks[0]:
        parts = [chunk[name] for chunk in chunks]
        columns[name] = (np.concatenate(parts) if all(isinstance(p, np.ndarray) for p in parts)
                         else [row for part in parts for row in part])
    return columns


@torch.no_grad()
def predict_shard(selection: Selection, replica: Replica) -> str | None:
    """Write this rank's rows; on rank 0, the whole file (joined from every rank's shard under
    ddp). Returns the file's path on rank 0, None elsewhere."""
    from stepwise.data.batches import call_model
    from stepwise.loop.precision import Precision

    model = checkpoint_model(selection, replica)
    loader, batches = shard(selection, replica)
    put = on_device(selection, replica)
    precision = Precision(selection.config.trainer.precision, replica.device)
    classification = getattr(selection.data, "task", "classification") == "classification"
    chunks = []
    for (inputs, target), indices in zip(loader, batches):
        inputs, target = put(inputs, target)
        with precision.autocast():
            out = call_model(model, inputs)
        chunks.append(batch_columns(out, target, indices, classification))
    path = output_path(selection)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not replica.distributed:
        _write(_joined(chunks), path, selection)
        return str(path)
    part = path.with_name(f".{path.stem}.rank{replica.rank}.parquet")
    _write(_joined(chunks), part, selection)
    parts = replica.all_gather_object(str(part))  # every rank's shard is written
    if not replica.is_main:
        return None
    _assemble([Path(p) for p in parts], path, selection)
    return str(path)


def _write(columns: dict[str, Any], path: Path, selection: Selection) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table(columns) if columns else pa.table({"index": pa.array([], pa.int64())})
    metadata = {b"stepwise": json.dumps(selection.record()).encode()}
    pq.write_table(table.replace_schema_metadata(metadata), path)


def _assemble(parts: list[Path], path: Path, selection: Selection) -> None:
    """Join the ranks' shards in rank order (contiguous shards: sample order); every index of
    the split exactly once, or the file is not written."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    tables = [pq.read_table(part) for part in parts]
    table = pa.concat_tables([t for t in tables if t.num_rows] or tables[:1])
    index = table.column("index").to_numpy()
    if not np.array_equal(index, np.arange(selection.samples)):
        raise RuntimeError(f"predict: the ranks' shards hold {len(index)} rows, not the indices "
                           f"0..{selection.samples - 1} once each, in order")
    pq.write_table(table, path)
    for part in parts:
        part.unlink()


def run_predict(selection: Selection) -> str | None:
    """Predict, log the file into the run (with the tag), and return the final line (None on a
    rank other than 0 that torchrun or SLURM started)."""
    import pyarrow.parquet as pq

    written = run(selection, predict_shard)
    if written is None:
        return None
    path = Path(written)

    schema = pq.read_schema(path)
    rows = pq.read_metadata(path).num_rows
    where = "not logged: the run has no MLflow run"
    if selection.run_id is not None:
        from stepwise.tracking.addendum import add_to_run

        tag = TAG.format(name=selection.name)
        record = {**selection.record(), "file": str(path),
                  "artifact": f"{PREDICTIONS_DIR}/{path.name}"}
        add_to_run(selection.tracking_uri, selection.run_id, tags={tag: json.dumps(record)},
                   artifacts=[(path, PREDICTIONS_DIR)])
        where = f"logged into MLflow run {selection.run_id} as {PREDICTIONS_DIR}/{path.name}"
    names = _short(schema.names)
    return (f"predict: {rows} rows ({names}) of split={selection.split} by {selection.checkpoint} "
            f"(global_step {selection.global_step}) in {path}; {where}")


def _short(names: list[str]) -> str:
    """`index, target, logit_0..logit_9`: numbered columns shown as a range."""
    shown: list[list[str]] = []
    for name in names:
        stem, _, number = name.rpartition("_")
        last = shown[-1][-1] if shown else ""
        if number.isdigit() and last.rpartition("_")[0] == stem and \
                last.rpartition("_")[2] == str(int(number) - 1):
            shown[-1].append(name)
        else:
            shown.append([name])
    return ", ".join(run[0] if len(run) == 1 else f"{run[0]}..{run[-1]}" for run in shown)
