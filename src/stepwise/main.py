"""`python train.py`: the Hydra entry point, and the only code that sees a DictConfig."""

from __future__ import annotations

import logging
import os
import shutil
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from stepwise.config import register_configs
from stepwise.errors import ConfigError

log = logging.getLogger("stepwise")
CONF_DIR = Path(__file__).resolve().parents[2] / "conf"

register_configs()


def _discard_empty_run_dir(run_dir: Path) -> None:
    """A run stopped by a config error leaves no directory behind, unless it holds real work."""
    leftovers = {p.name for p in run_dir.iterdir()} - {".hydra", f"{HydraConfig.get().job.name}.log"}
    if not leftovers:
        shutil.rmtree(run_dir, ignore_errors=True)


def run(cfg: DictConfig) -> dict[str, float] | None:
    """Validate, plan, and (unless `dry_run`) train. Config errors exit 2 with one line."""
    from stepwise.dist_env import detect
    from stepwise.job import prepare
    from stepwise.sweep import sweep_job

    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    env = detect(os.environ)
    if env.rank != 0:  # rank 0 speaks for the job
        logging.getLogger().setLevel(logging.WARNING)
    try:
        job = prepare(OmegaConf.to_object(cfg), run_dir=run_dir, start_dir=Path.cwd(), env=env,
                      sweep=sweep_job(hydra_cfg))
    except ConfigError as err:
        if env.rank == 0:  # every rank finds the same mistake; one of them says it
            print(f"error: {err}", file=sys.stderr)
            _discard_empty_run_dir(run_dir)
        sys.exit(2)

    if env.rank == 0:
        OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)
        (run_dir / "plan.json").write_text(job.plan.to_json())
        log.info("plan (also in %s):\n%s", run_dir / "plan.json", job.plan.table())
        if job.config.data.batch_size == "auto":
            log.info("data.batch_size=auto: b = E / W above is tried before training and halved "
                     "(accum doubled) on out-of-memory")
    if job.config.dry_run:
        log.info("dry_run=true: stopping before training")
        return None

    from stepwise.launch import RanksFailed
    from stepwise.runner import execute
    from stepwise.trainer import NonFiniteLoss, PlanMismatch, Stopped

    try:
        return execute(job, log_file=str(run_dir / f"{hydra_cfg.job.name}.log"))
    except ConfigError as err:  # found once the checkpoint to resume from is read
        if env.rank == 0:
            print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except Stopped as stop:
        if env.rank == 0:
            print(f"stopped by signal {stop.signum} after saving a checkpoint in "
                  f"{run_dir / 'checkpoints'}; run the same command with "
                  f"hydra.run.dir={run_dir} to resume (trainer.resume=auto)", file=sys.stderr)
        stop.forward()  # e.g. submitit's SIGUSR2 handler, which requeues the job and exits
        sys.exit(128 + stop.signum)
    except (NonFiniteLoss, PlanMismatch) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
    except RanksFailed as err:
        print(f"error: a DDP worker failed; the job is stopped.\n{err}", file=sys.stderr)
        sys.exit(1)


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def _hydra_main(cfg: DictConfig) -> float | None:
    metrics = run(cfg)
    if cfg.optimized_metric is None or metrics is None:
        return None
    try:
        return objective(metrics, cfg.optimized_metric)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


def objective(metrics: dict[str, float], name: str) -> float:
    """The value a sweeper optimises: the run's final `name` metric."""
    if name not in metrics:
        raise ConfigError("optimized_metric", name, "the run logs no such final metric",
                          f"use one of {', '.join(sorted(metrics))}")
    return float(metrics[name])


def main() -> None:
    """Run Hydra; report a composition error in one line (exit 2) unless HYDRA_FULL_ERROR is set."""
    if "RANK" in os.environ or "SLURM_PROCID" in os.environ:  # maybe one rank of several
        from stepwise.launch import shared_run_dir_overrides

        sys.argv += shared_run_dir_overrides(sys.argv[1:], os.environ)
    if os.environ.get("HYDRA_FULL_ERROR"):
        _hydra_main()
        return
    # Ask Hydra to re-raise instead of printing, so that composition errors can be reported in one
    # line; anything else keeps its traceback, as Hydra would show it with HYDRA_FULL_ERROR=1.
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        _hydra_main()
    except Exception as err:
        from hydra.errors import ConfigCompositionException, OverrideParseException

        if not isinstance(err, (ConfigCompositionException, OverrideParseException)):
            raise
        from stepwise.cli_errors import one_line

        message = one_line(err, sys.argv[1:])
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)
    finally:
        os.environ.pop("HYDRA_FULL_ERROR", None)
