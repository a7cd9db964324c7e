"""`python -m stepwise ...`: the same as `stepwise ...` and, in a checkout, `python train.py ...`."""

from stepwise.main import main

if __name__ == "__main__":  # DDP workers are spawned: they must not re-run the entry point
    main()
