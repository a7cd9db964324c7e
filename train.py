from stepwise.main import main

if __name__ == "__main__":  # DDP workers are spawned: they must not re-run the entry point
    main()
