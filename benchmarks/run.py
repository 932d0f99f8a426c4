"""Run fxalign's benchmark and write ``docs/benchmarks.md``.

    python -m benchmarks.run [--quick] [--models resnet50 bert-base ...] [--out docs/benchmarks.md]

The measurements live in :mod:`fxalign.bench` so that ``fxalign bench`` (same options) works
from an installed package too; this file is the repository's entry point.
"""

from __future__ import annotations

import sys

from fxalign.bench import main

if __name__ == "__main__":
    sys.exit(main())
