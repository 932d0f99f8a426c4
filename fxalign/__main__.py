"""``python -m fxalign``: the ``fxalign`` command, for environments without its script."""

import sys

from fxalign.cli import main

__all__: list[str] = []

if __name__ == "__main__":
    sys.exit(main())
