"""``python -m fusedlm ...``: the ``fusedlm`` command (train, sample, prepare, info, bench)."""

import sys

from .cli import main

sys.exit(main())
