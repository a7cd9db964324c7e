"""A Hydra multirun as one MLflow parent run, every job of it a child run.

`SweepParent` is a Hydra callback (registered in conf/config.yaml). In the process that runs
`python train.py -m ...` it opens the parent run before any job starts, and writes its id to
`<sweep dir>/.stepwise_sweep.json`; each job, wherever it runs (in that process, a submitit
subprocess, a SLURM node sharing the file system), reads that file and tags its own run with
`mlflow.parentRunId`. At the end the parent gets `sweep_summary.csv` and `sweep_losses.png`
(see `sweep_report`), and ends FINISHED only if every child did.
"""

from __future__ import annotations

import atexit
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from stepwise.contract.errors import ConfigError
from stepwise.contract.world import submitit_tasks_per_node

log = logging.getLogger(__name__)

SWEEP_FILE = ".stepwise_sweep.json"
SUBMITIT_PREFIX = "hydra_plugins.hydra_submitit_launcher"


@dataclass(frozen=True)
class SweepJob:
    """Where one job of a multirun belongs: its parent run and its place in the sweep."""

    parent_run_id: str
    tracking_uri: str
    sweep_dir: str
    job_num: int
    overrides: tuple[str, ...]

    @property
    def run_name(self) -> str:
        return " ".join(self.overrides) or f"job {self.job_num}"

    def tags(self) -> dict[str, str]:
        return {"mlflow.parentRunId": self.parent_run_id, "stepwise.sweep_dir": self.sweep_dir,
                "stepwise.job_num": str(self.job_num),
                "stepwise.overrides": " ".join(self.overrides)}


def sweep_job(hydra_cfg: Any) -> SweepJob | None:
    """This job's place in its sweep (`hydra_cfg` is HydraConfig.get()), or None outside one."""
    from hydra.types import RunMode

    if hydra_cfg.mode != RunMode.MULTIRUN:
        return None
    sweep_dir = (Path(hydra_cfg.runtime.cwd) / hydra_cfg.sweep.dir).resolve()
    path = sweep_dir / SWEEP_FILE
    if not path.exists():  # logger=none for the sweep, or callbacks removed by the user
        return None
    parent = json.loads(path.read_text())
    return SweepJob(parent["run_id"], parent["tracking_uri"], str(sweep_dir),
                    int(hydra_cfg.job.num), tuple(hydra_cfg.overrides.task))


def check_launcher(config: DictConfig) -> None:
    """A submitit launcher's `tasks_per_node` must match the ranks `parallel` asks for."""
    launcher = config.hydra.launcher
    if not str(launcher.get("_target_", "")).startswith(SUBMITIT_PREFIX):
        return
    parallel = config.parallel
    nproc = parallel.get("nproc")
    expected = submitit_tasks_per_node(parallel.mode, nproc, launcher.get("gpus_per_node"))
    tasks = launcher.get("tasks_per_node", 1)
    if tasks == expected:
        return
    if parallel.mode not in ("ddp", "fsdp"):
        raise ConfigError("hydra.launcher.tasks_per_node", tasks,
                          f"parallel={parallel.mode} runs one process per job",
                          "leave tasks_per_node out (it follows parallel), or use parallel=ddp")
    raise ConfigError("hydra.launcher.tasks_per_node", tasks,
                      f"parallel={parallel.mode} with parallel.nproc={nproc} runs {expected} ranks "
                      "per node",
                      f"leave tasks_per_node out (it follows parallel.nproc), or set "
                      f"parallel.nproc={tasks}")


class SweepParent(Callback):
    """Opens the sweep's parent run at the start of a multirun and closes it at the end.

    Only strings are kept on the instance: submitit pickles the callbacks with each job.
    """

    def __init__(self) -> None:
        self.run_id: str | None = None
        self.tracking_uri: str | None = None
        self.sweep_dir: str | None = None
        self.direction: str | None = None  # the sweeper's (Optuna's), as min or max

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        # Hydra turns a callback's exception into a warning and sweeps on: a bad launcher
        # setting or tracking URI must stop the sweep here, in one line, before any job starts.
        try:
            self._open(config)
        except ConfigError as err:
            print(f"error: {err}", file=sys.stderr)
            sys.exit(2)

    def _open(self, config: DictConfig) -> None:
        from stepwise.tracking.auth import check_tracking
        from stepwise.tracking.best_child import sweeper_direction
        from stepwise.tracking.tracker import MlflowTracker, default_tracking_uri

        check_launcher(config)
        logger = config.logger
        if logger.backend == "none":
            return
        check_tracking(logger, Path.cwd(), dry_run=False)
        sweep_dir = Path(config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        overrides = list(config.hydra.overrides.task)
        uri = default_tracking_uri(logger.tracking_uri, Path.cwd())
        tracker = MlflowTracker(uri, logger.experiment_name,
                                run_name=logger.run_name or f"sweep {' '.join(overrides)}",
                                tags={"stepwise.sweep_dir": str(sweep_dir.resolve()),
                                      "stepwise.role": "sweep"})
        tracker.log_params({"sweep.overrides": " ".join(overrides),
                            "sweep.launcher": OmegaConf.select(config, "hydra.launcher._target_")})
        tracker.close()  # sent before any job starts; the run stays RUNNING until the end
        self.run_id, self.tracking_uri, self.sweep_dir = tracker.run_id, uri, str(sweep_dir)
        self.direction = sweeper_direction(OmegaConf.select(config, "hydra.sweeper.direction"))
        (sweep_dir / SWEEP_FILE).write_text(json.dumps({"run_id": self.run_id,
                                                        "tracking_uri": uri}))
        log.info("sweep parent run %s in %s", self.run_id, uri)
        # A job that fails stops Hydra's sweep before on_multirun_end: close the parent anyway.
        atexit.register(self._close)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        self._close()

    def _close(self) -> None:
        if self.run_id is None:
            return
        run_id, self.run_id = self.run_id, None
        from stepwise.tracking.sweep_report import close_parent

        status = close_parent(self.tracking_uri, run_id, Path(self.sweep_dir), self.direction)
        log.info("sweep parent run %s: %s (summary in %s)", run_id, status, self.sweep_dir)
