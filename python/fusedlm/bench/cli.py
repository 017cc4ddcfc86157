"""``fusedlm bench``: see fusedlm.bench."""


def add_commands(commands) -> None:
    """Adds ``bench`` to the ``fusedlm`` subparsers (filled in by the benchmark harness)."""
