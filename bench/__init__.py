"""Load benchmark helpers for ``textserve bench`` (see models/commands/bench.py)."""
