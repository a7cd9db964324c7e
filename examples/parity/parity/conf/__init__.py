"""The project's config groups (a package, so that `pkg://parity.conf` finds them)."""
