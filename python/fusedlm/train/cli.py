"""``fusedlm train``, ``sample`` and ``prepare``."""


def add_commands(commands) -> None:
    """Adds train, sample and prepare to the ``fusedlm`` subparsers."""
