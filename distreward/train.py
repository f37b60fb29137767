"""``python -m distreward.train [STAGE] [--flags]``: the command line of :mod:`distreward.cli` (its stages, flags and
user errors live there)."""
import sys

from distreward.cli import interrupt_on_sigterm, main

if __name__ == "__main__":
    interrupt_on_sigterm()
    sys.exit(main())
