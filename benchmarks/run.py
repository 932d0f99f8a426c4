"""Run fxalign's benchmark and write ``docs/benchmarks.md``.

    python -m benchmarks.run [--quick] [--models resnet50 bert-base ...] [--out docs/benchmarks.md]

The harness is :mod:`benchmarks.harness`; it lives outside the installed package.
"""

from __future__ import annotations

import sys

from benchmarks.harness import main

if __name__ == "__main__":
    sys.exit(main())
