"""`python -m stepwise.tracking.replay <run dir> [--tracking-uri URI]`: send what a job could not send to
its MLflow run (the run dir's `mlflow_unsent/`, written when the tracking store did not answer
by the end of the job), and set the run's final status as the job ended.

Metric values keep their steps and timestamps. Each spooled file is removed once sent, so an
interrupted replay can be run again (a SQL store ignores a metric value it already holds).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from stepwise.tracking.outbox import UNSENT_DIR, read_ops, send


def replay(run_dir: Path, tracking_uri: str | None = None) -> dict[str, int]:
    """Send every spooled operation of `run_dir`, the final status last. Returns counts per kind.

    Raises:
        FileNotFoundError: nothing is spooled there.
    """
    from mlflow.tracking import MlflowClient

    files = sorted((run_dir / UNSENT_DIR).glob("*.jsonl"))
    if not files:
        raise FileNotFoundError(f"{run_dir / UNSENT_DIR} holds nothing to send")
    headers_ops = [read_ops(path) for path in files]
    counts: dict[str, int] = {}
    terminate = []
    for path, (header, ops) in zip(files, headers_ops):
        client = MlflowClient(tracking_uri or header["tracking_uri"])
        for op in ops:
            if op[0] == "terminate":  # after everything else, whichever file holds it
                terminate.append((client, header["run_id"], op))
                continue
            send(client, header["run_id"], op)
            counts[op[0]] = counts.get(op[0], 0) + (len(op[1]) if op[0] == "metrics" else 1)
        if not any(op[0] == "terminate" for op in ops):
            path.unlink()
    for client, run_id, op in terminate:
        send(client, run_id, op)
        counts["terminate"] = counts.get("terminate", 0) + 1
    for path in files:
        path.unlink(missing_ok=True)
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stepwise.tracking.replay", description=__doc__.split(
        "\n\n")[0])
    parser.add_argument("run_dir", type=Path, help="the job's run directory")
    parser.add_argument("--tracking-uri", help="send to this store instead of the one the job "
                        "used (e.g. the server's new address)")
    args = parser.parse_args(argv)
    try:
        counts = replay(args.run_dir, args.tracking_uri)
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except Exception as err:  # the store still does not answer: the files stay for a retry
        print(f"error: not all sent ({str(err).splitlines()[0]}); what is left stays in "
              f"{args.run_dir / UNSENT_DIR}: run this again once the store answers",
              file=sys.stderr)
        return 1
    print("sent: " + ", ".join(f"{n} {kind}" for kind, n in counts.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
