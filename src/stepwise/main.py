"""`python train.py`: the Hydra entry point, and the only code that sees a DictConfig."""

from __future__ import annotations

import logging
import os
import shutil
import sys
import time
import traceback
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, MissingMandatoryValue, OmegaConf

from stepwise.config.schemas import CONF_DIR, check_known_keys, give_user_groups_schemas, register_configs
from stepwise.contract.errors import ConfigError
from stepwise.loop.cpu_isa import guard_run
from stepwise.loop.signals import STOP, Stopped, stop_in

log = logging.getLogger("stepwise")

register_configs()
VERIFY: dict | None = None  # `stepwise verify`'s settings (stepwise/verify.py), else None


def _discard_empty_run_dir(run_dir: Path) -> None:
    """A run stopped by a config error leaves no directory behind, unless it holds real work."""
    from stepwise.run.rundir import LOCK_FILE

    leftovers = {p.name for p in run_dir.iterdir()} - {".hydra", LOCK_FILE,
                                                        f"{HydraConfig.get().job.name}.log"}
    if not leftovers:
        shutil.rmtree(run_dir, ignore_errors=True)
        # ... nor the folders Hydra made for it (outputs/<date>/), when they hold nothing else
        top = Path(HydraConfig.get().runtime.cwd).resolve()
        for parent in run_dir.resolve().parents:
            if parent == top or top not in parent.parents or any(parent.iterdir()):
                break
            parent.rmdir()


def run(cfg: DictConfig) -> dict[str, float] | None:
    """Validate, plan, and (unless `dry_run`) train. Config errors exit 2 with one line; a stop
    signal exits 128 + the signal."""
    from stepwise.contract.dist_env import detect

    STOP.install()  # a sweep's jobs (submitit) start here, not in main()
    started = time.time()
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    env = detect(os.environ)
    if env.rank != 0:  # rank 0 speaks for the job
        logging.getLogger().setLevel(logging.WARNING)
    try:
        STOP.start_job()
        return _run(cfg, run_dir, env.rank)
    except BaseException as err:
        STOP.end_job()
        if isinstance(err, (SystemExit, KeyboardInterrupt)) or (stop := stop_in(err)) is None:
            raise
        if env.rank == 0:
            print(_stopped(stop, run_dir, started), file=sys.stderr)
        stop.forward()  # e.g. submitit's SIGUSR2 handler, which requeues the job and exits
        sys.exit(128 + stop.signum)
    finally:
        STOP.end_job()


def _stopped(stop: Stopped, run_dir: Path, started: float) -> str:
    """What a stopped job says: whether it saved a checkpoint (its own, since `started`)."""
    from stepwise.run.checkpoint import step_files

    resume = f"run the same command with hydra.run.dir={run_dir} to resume (trainer.resume=auto)"
    newest = step_files(run_dir / "checkpoints")
    if newest and newest[0].stat().st_mtime >= started:
        return (f"stopped by signal {stop.signum} after saving a checkpoint in "
                f"{run_dir / 'checkpoints'}; {resume}")
    if newest:
        return f"stopped by signal {stop.signum} before training went on; {resume}"
    return f"stopped by signal {stop.signum} before training started"


def _run(cfg: DictConfig, run_dir: Path, rank: int) -> dict[str, float] | None:
    from stepwise.contract.dist_env import detect
    from stepwise.run.job import prepare
    from stepwise.tracking.sweep import sweep_job

    try:
        give_user_groups_schemas(cfg)
        config = OmegaConf.to_object(cfg)
    except (ConfigError, MissingMandatoryValue) as err:
        _config_error(err, run_dir, rank)
    guard_run(config.trainer.precision, config.trainer.device, warn=rank == 0)
    try:
        check_known_keys(cfg)
        job = prepare(config, run_dir=run_dir, start_dir=Path.cwd(), env=detect(os.environ),
                      sweep=sweep_job(HydraConfig.get()))
    except ConfigError as err:
        _config_error(err, run_dir, rank)

    if rank == 0:
        OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)
        (run_dir / "plan.json").write_text(job.plan.to_json())
        log.info("plan (also in %s):\n%s", run_dir / "plan.json", job.plan_table())
        if job.config.data.batch_size == "auto":
            log.info("data.batch_size=auto: b = E / W above is tried before training and halved "
                     "(accum doubled) on out-of-memory")
    if job.config.dry_run:
        log.info("dry_run=true: stopping before training")
        return None
    if VERIFY is not None:
        from stepwise.verify import verify_job

        try:
            status = verify_job(job, run_dir, VERIFY)
        except ConfigError as err:
            _config_error(err, run_dir, rank)
        sys.exit(status)
    return _train(job, run_dir, rank)


def _config_error(err: Exception, run_dir: Path, rank: int) -> None:
    """One line (from one rank: every rank finds the same mistake), no run dir left, exit 2."""
    if rank == 0:
        if isinstance(err, MissingMandatoryValue):
            err = ConfigError(err.full_key, "???", "has no value (the config marks it ???)",
                              f"set {err.full_key}=...")
        if os.environ.get("STEPWISE_FULL_ERROR") and err.__cause__ is not None:
            traceback.print_exception(err.__cause__)  # the user's HYDRA_FULL_ERROR=1
        print(f"error: {err}", file=sys.stderr)
        _discard_empty_run_dir(run_dir)
    sys.exit(2)


def _train(job, run_dir: Path, rank: int) -> dict[str, float]:
    from stepwise.contract.errors import RanksFailed, RunFailed, UserCodeFailed
    from stepwise.run.runner import execute

    try:
        return execute(job, log_file=str(run_dir / f"{HydraConfig.get().job.name}.log"))
    except ConfigError as err:  # found once the checkpoint to resume from is read
        if rank == 0:
            print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except RunFailed as err:
        if isinstance(err, UserCodeFailed):  # the user's bug: its traceback once, then one line
            sys.stderr.write(err.details)
        why = "a DDP worker failed; the job is stopped.\n" if isinstance(err, RanksFailed) else ""
        print(f"error: {why}{err}", file=sys.stderr)
        sys.exit(err.exit_code)


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def _hydra_main(cfg: DictConfig) -> float | None:
    metrics = run(cfg)
    if cfg.optimized_metric is None or metrics is None:
        return None
    try:
        return objective(metrics, cfg.optimized_metric, cfg.trainer.monitor)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


def objective(metrics: dict[str, float], name: str, monitor: str | None = None) -> float:
    """The value a sweeper optimises: the run's final `name` metric, or, with `trainer.monitor`,
    its value at the best evaluation (`best/<name>`: the evaluation best.pt holds)."""
    if monitor is not None and f"best/{name}" in metrics:
        name = f"best/{name}"
    if name not in metrics:
        raise ConfigError("optimized_metric", name, "the run logs no such final metric",
                          f"use one of {', '.join(sorted(metrics))}")
    return float(metrics[name])


def _verify_args() -> None:
    """`stepwise verify ...`: its own `verify.*` keys out of the job's overrides (one line for a
    mistake), and the run named verify (its log, `verify.log`)."""
    from stepwise.verify import split_args

    global VERIFY
    try:
        VERIFY, rest = split_args(sys.argv[2:])
        if multirun := {"-m", "--multirun"} & set(rest):
            raise ConfigError(multirun.pop(), "verify", "verify runs one job, not a sweep",
                              "verify each job of the sweep on its own")
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    sys.argv[1:] = [*rest, "hydra.job.name=verify"]


def main() -> None:
    """Run Hydra; report a composition error in one line (exit 2) unless HYDRA_FULL_ERROR is set.

    A stop signal (SIGTERM, SIGUSR2) at any moment ends the job with exit 128 + the signal.
    `stepwise eval ...` and `stepwise predict ...` (no Hydra override is a bare word) work on a
    finished run instead: stepwise/eval.py."""
    from stepwise.config.cli_errors import check_launcher

    if sys.argv[1:2] in (["eval"], ["predict"]):
        from stepwise.eval import main as offline

        offline(sys.argv[2:], sys.argv[1])
        return
    if sys.argv[1:2] == ["verify"]:
        _verify_args()

    if (message := check_launcher(sys.argv[1:])) is not None:  # Hydra would train here instead
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)
    STOP.install()
    from stepwise.run.rundir import publish_none, wait_for_readers

    try:
        if "RANK" in os.environ or "SLURM_PROCID" in os.environ:  # maybe one rank of several
            from stepwise.run.rundir import rank_overrides

            sys.argv += rank_overrides(sys.argv[1:], os.environ)
        _main()
    except BaseException as err:  # a stop before the job started: nothing exists yet
        if isinstance(err, (SystemExit, KeyboardInterrupt)) or (stop := stop_in(err)) is None:
            raise
        print(f"stopped by signal {stop.signum} before training started", file=sys.stderr)
        sys.exit(128 + stop.signum)
    finally:
        publish_none()  # rank 0 stopped before naming the run directory: the others stop too
        wait_for_readers()  # ... and its store must outlive their reading it


def _main() -> None:
    if os.environ.get("HYDRA_FULL_ERROR"):
        os.environ["STEPWISE_FULL_ERROR"] = "1"  # a component's error shows its traceback too
        _hydra_main()
        return
    # Ask Hydra to re-raise instead of printing, so that composition errors can be reported in one
    # line; anything else keeps its traceback, as Hydra would show it with HYDRA_FULL_ERROR=1.
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        _hydra_main()
    except Exception as err:
        from hydra.errors import ConfigCompositionException, OverrideParseException
        from yaml import YAMLError

        if not isinstance(err, (ConfigCompositionException, OverrideParseException, YAMLError)):
            raise
        from stepwise.config.cli_errors import one_line

        message = one_line(err, sys.argv[1:])
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)
    finally:
        os.environ.pop("HYDRA_FULL_ERROR", None)
