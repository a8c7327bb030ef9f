"""The seed experiment's speed per BN mode: ms/step, 800-batch run, time to 95/97%, inference, memory.

    python benchmarks/train_speed.py [--runs 3] [--paths fast,slow] [--device auto]

Each mode runs in its own process. Same figures as `bnlab bench train`.
"""

import argparse

from bnlab import bench

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--runs", type=int, default=3, help="800-batch runs per mode (default 3)")
parser.add_argument("--paths", default="fast", help="fast and/or slow (the --no-fast path), comma-separated")
parser.add_argument("--device", default="auto")
args = parser.parse_args()
print(bench.describe_machine())
results = bench.training_benchmark(
    paths=[p == "fast" for p in args.paths.split(",")], runs=args.runs, device=args.device
)
print(bench.training_table(results))
