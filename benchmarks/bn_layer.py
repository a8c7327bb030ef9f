"""Forward + backward of bnlab's BatchNorm against torch.nn's, per shape and layout.

    python benchmarks/bn_layer.py [--repeats 30] [--relu]

Shapes: the seed network's 20 BN layers at batch 64, and N=32, C=64, 56x56; contiguous and
channels_last. Prints median microseconds and the ratio bnlab/torch (below 1: bnlab is faster).
"""

import argparse

from bnlab import bench, kernels

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--repeats", type=int, default=30, help="timed repetitions per shape (default 30)")
parser.add_argument("--relu", action="store_true", help="BN + ReLU: torch's two layers vs bnlab's fused one")
args = parser.parse_args()
print(bench.describe_machine())
print(f"bnlab kernels: {kernels.status()}\n")
print(bench.layer_table(bench.layer_benchmark(repeats=args.repeats, relu=args.relu)))
