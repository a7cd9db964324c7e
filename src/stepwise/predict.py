"""`stepwise predict` (`python -m stepwise.predict`): per-sample outputs of a run's checkpoint
on a split, in a Parquet file of the run directory, logged as an artifact of the run. The
arguments are `stepwise eval`'s (stepwise/eval.py); the file's columns: stepwise/run/prediction.py.
"""

from __future__ import annotations


def main(argv: list[str] | None = None) -> None:
    from stepwise.eval import main as offline

    offline(argv, "predict")


if __name__ == "__main__":  # DDP workers are spawned: they must not re-run the entry point
    main()
