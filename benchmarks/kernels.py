"""Kernel benchmark: ``python benchmarks/kernels.py --out DIR`` (see tensorpress/kernels/bench.py)."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tensorpress.kernels.bench import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
