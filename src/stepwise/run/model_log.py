"""The models a finished run logs to MLflow: the final one, and with `trainer.monitor` the best
one (checkpoints/best.pt's weights), registered as `logger.register_model`. The MLflow format
itself (a torch.export program, else the pickled module; the signature) is
`stepwise.tracking.models`: the line that reports a model says its form, and for a pickled one
why and what loading it needs.
"""

from __future__ import annotations

import logging
from typing import Any

from torch import nn

from stepwise.tracking.models import BEST_NAME, MODEL_NAME

log = logging.getLogger(__name__)


def monitored_weights(state: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """The weights of best.pt that `trainer.monitor` judged: the model's, or for a
    `val_<suffix>/` metric those of the callback that evaluates as `<suffix>` (the EMA's);
    with the words that say whose they are."""
    from stepwise.run.checkpoint import averaged_weights

    prefix = state["monitor"].split("/", 1)[0]
    suffix = prefix.removeprefix("val_")
    if suffix != prefix and (weights := averaged_weights(state, suffix)) is not None:
        return weights, f", the {suffix} weights"
    return state["model"], ""


def log_run_models(job: Any, model: nn.Module, tracker: Any, global_step: int) -> None:
    """At the end of a run that trained fine, on the process that holds the model: log the final
    model, and with `trainer.monitor` the best one (best.pt's weights); register the best one
    (else the final one) as `logger.register_model`.

    The model is part of the record, but the run's weights are safe in its checkpoints: a
    failure to log it is reported (error line) and the run stays FINISHED, as long as
    checkpoints/last.pt exists; without it the error is raised (the run ends FAILED).
    `model` is moved to the CPU: the run is over.
    """
    from stepwise.data.loaders import fetch
    from stepwise.loop.precision import param_dtype
    from stepwise.run.checkpoint import BEST_FILE, load_checkpoint

    cfg = job.config
    if not cfg.logger.log_model or tracker.run_id is None:
        return
    checkpoints = job.run_dir / "checkpoints"
    best = checkpoints / BEST_FILE if cfg.trainer.monitor is not None else None
    register = cfg.logger.register_model
    try:
        example, _ = fetch(job.data, param_dtype(cfg.trainer.precision), cfg.seed,
                           list(range(min(2, job.data.train_samples))))
        model = model.cpu().eval()
        logged = tracker.log_model(model, example, name=MODEL_NAME, step=global_step,
                                   registered_model_name=None if best else register)
        log.info("final model logged to MLflow%s", logged.describe())
        if best is None:
            return
        if not best.exists():
            log.warning("no evaluation gave a finite %s: no best model to log",
                        cfg.trainer.monitor)
            return
        state = load_checkpoint(best)
        weights, whose = monitored_weights(state)
        model.load_state_dict(weights)
        logged = tracker.log_model(model, example, name=BEST_NAME, step=state["global_step"],
                                   registered_model_name=register)
        log.info("best model (%s=%.6g at global_step %d%s) logged to MLflow%s", state["monitor"],
                 state["best_value"], state["global_step"], whose, logged.describe())
    except Exception as err:
        if not (checkpoints / "last.pt").exists():
            raise
        log.error("the model could not be logged to MLflow (%s: %s); the run's weights are in "
                  "%s", type(err).__name__, str(err).strip().splitlines()[0][:300] if str(err)
                  else "", checkpoints)
