"""`stepwise eval` (`python -m stepwise.eval`): a run's checkpoint evaluated on a split, logged
into that run as `eval/<split>/*`. `stepwise predict` (stepwise/predict.py) shares this entry.

    stepwise eval run=<MLflow run id or run dir> [which=last|best] [weights=model|ema] [split=val|test]
                  [data=<option>] [data.<key>=<value>...] [parallel=ddp [parallel.nproc=N]]
                  [trainer.device=cpu] [logger.tracking_uri=URI]
    stepwise eval ckpt=<checkpoint file> ...

Exit status: 0; 2 for a mistake in the arguments (one line); 1 when a rank failed.
"""

from __future__ import annotations

import logging
import sys

LOG_FORMAT = "[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"


def main(argv: list[str] | None = None, command: str = "eval") -> None:
    """Parse `argv` (default: the command line), select the run and checkpoint, run `command`
    (`eval` or `predict`) and print its final line."""
    from stepwise.config.saved import parse_args
    from stepwise.contract.errors import ConfigError, RunFailed

    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT, stream=sys.stderr)
    argv = sys.argv[1:] if argv is None else argv
    try:
        from stepwise.run.selection import select

        selection = select(parse_args(command, argv))
        if command == "eval":
            from stepwise.run.evaluation import run_eval

            line = run_eval(selection)
        else:
            from stepwise.run.prediction import run_predict

            line = run_predict(selection)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except RunFailed as err:
        print(f"error: a DDP worker failed.\n{err}", file=sys.stderr)
        sys.exit(err.exit_code)
    if line is not None:  # None: a rank other than 0, which torchrun or SLURM started
        print(line)


if __name__ == "__main__":  # DDP workers are spawned: they must not re-run the entry point
    main()
