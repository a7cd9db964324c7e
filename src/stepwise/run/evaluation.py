"""`stepwise eval`: a checkpoint evaluated on a split with validation's exact reductions (sums and
counts over all ranks, torchmetrics states reduced; never a mean of means), logged as
`eval/<split>/loss` and `eval/<split>/<metric>` into the run that made the checkpoint.
"""

from __future__ import annotations

import json
import logging

from stepwise.parallel.replica import Replica
from stepwise.run.offline import checkpoint_model, on_device, run, shard
from stepwise.run.selection import Selection

log = logging.getLogger("stepwise")

TAG = "stepwise.eval.{name}"  # which checkpoint and data the eval/<name>/* metrics are of


def evaluate_shard(selection: Selection, replica: Replica) -> dict[str, float]:
    """`eval/<split>/loss` and the metrics of this rank's shard, reduced over every rank (so
    each rank returns the same numbers): what validation computes, on the selected split."""
    from stepwise.loop.precision import Precision
    from stepwise.loop.validation import evaluate
    from stepwise.run.build import build_loss, build_metrics

    config, data = selection.config, selection.data
    model = checkpoint_model(selection, replica)
    loader, _ = shard(selection, replica)
    metrics = build_metrics(config, data)
    if metrics is not None:
        metrics = {name: metric.to(replica.device) for name, metric in metrics.items()}
    results = evaluate(model, loader, build_loss(config, data), metrics, replica,
                       Precision(config.trainer.precision, replica.device),
                       on_device(selection, replica))
    # validation names them val/<metric>; the same numbers, of this split, as eval/<name>/...
    return {f"eval/{selection.name}/{key.split('/', 1)[1]}": value
            for key, value in results.items()}


def run_eval(selection: Selection) -> str | None:
    """Evaluate, log into the run (at the checkpoint's global_step, with the tag), and return
    the final line (None on a rank other than 0 that torchrun or SLURM started)."""
    metrics = run(selection, evaluate_shard)
    if metrics is None:
        return None
    if selection.data_overrides and selection.args.name is None:
        log.warning("%s: eval/%s/* now holds this data's numbers beside the run's own data's, at "
                    "the same step; add name=<label> to log them as eval/<label>/* instead",
                    " ".join(selection.data_overrides), selection.name)
    where = "not logged: the run has no MLflow run"
    if selection.run_id is not None:
        from stepwise.tracking.addendum import add_to_run

        tag = TAG.format(name=selection.name)
        add_to_run(selection.tracking_uri, selection.run_id, metrics=metrics,
                   step=selection.global_step, tags={tag: json.dumps(selection.record())})
        where = (f"logged into MLflow run {selection.run_id} at step {selection.global_step} "
                 f"(tag {tag})")
    numbers = " ".join(f"{key}={value:.6g}" for key, value in metrics.items())
    return (f"eval: {numbers} ({selection.checkpoint}, global_step {selection.global_step}, "
            f"split={selection.split}: {selection.samples} samples, world_size "
            f"{selection.world.size}); {where}")
