"""Kernel benchmark on a CUDA machine: ``python benchmarks/kernels.py`` (see tensorpress/kernels/bench.py).

Writes ``benchmarks/results/kernels-<device name>/bench.{json,md}`` unless ``--out DIR`` is given.
"""
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from tensorpress.kernels.bench import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(results_dir=os.path.join(HERE, "results")))
