"""``bnlab check`` and ``bnlab bench``: a verdict on a model, and speed figures."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from bnlab.cli.args import common, csv_choices, emitter, positive_int, repeats_int, writable_file
from bnlab.config import BN_MODES


def cmd_check(args: argparse.Namespace) -> int:
    from bnlab.check import check_model, load_check_target

    if str(Path.cwd()) not in sys.path:  # as with `python -m`: MODEL's module may sit in the current folder
        sys.path.insert(0, str(Path.cwd()))
    model, batch_size = load_check_target(args.model, args.device)
    trained_with = args.train_batch_size or batch_size
    report = check_model(model, samples=args.samples, data_dir=args.data_dir, train_batch_size=trained_with)
    emit = emitter(args)
    emit(f"bnlab check {args.model} ({type(model).__name__})")
    emit(report.format())
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    return 1 if report.errors or (args.strict and report.warnings) else 0


def cmd_bench(args: argparse.Namespace) -> int:
    from bnlab import bench
    from bnlab.fileio import write_json

    out_file = writable_file(args.out) if args.out else None  # before the benchmark, not after it
    emit = emitter(args)
    machine = bench.describe_machine()
    emit(f"Machine: {machine}")
    out: dict = {"machine": machine}
    if args.what in ("layer", "all"):
        timings = bench.layer_benchmark(repeats=args.repeats)
        emit("\nBatch-norm layer, forward + backward (median microseconds):\n" + bench.layer_table(timings))
        fused = bench.layer_benchmark(repeats=args.repeats, relu=True)
        emit("\nBatch norm + ReLU (bnlab fuses the ReLU):\n" + bench.layer_table(fused))
        out["layer"] = [vars(t) for t in timings] + [vars(t) for t in fused]
    if args.what in ("train", "all"):
        paths = [p == "fast" for p in args.paths.split(",")]
        results = bench.training_benchmark(
            modes=args.bn.split(","), paths=paths, runs=args.runs, device=args.device, data_dir=args.data_dir, log=emit
        )
        emit("\nSeed experiment, 800 batches of 64 (median, min-max):\n" + bench.training_table(results))
        out["train"] = results
    if out_file is not None:
        write_json(out_file, out)
        emit(f"\nWritten to {out_file}")
    if args.json:
        print(json.dumps(out, indent=2))
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "check",
        help="is batch norm used correctly? findings with fixes, exit 1 if any",
        description="Check how a model uses batch norm, on MNIST test images; every finding comes with its fix. "
        "Exit status 0: nothing wrong, 1: an error found (or a warning, with --strict), 2: bad usage.",
    )
    p.add_argument(
        "model",
        metavar="MODEL",
        help="a run directory or checkpoint written by bnlab, or module:factory, a function returning any "
        "nn.Module (importable from the current folder or PYTHONPATH), in the mode you run inference in",
    )
    p.add_argument(
        "--samples", type=positive_int, default=100,
        help="test images scored alone and in a batch (default: 100)",
    )  # fmt: skip
    p.add_argument(
        "--train-batch-size", type=positive_int, metavar="N",
        help="the samples each batch-norm statistic came from in training (the per-process batch, times the "
        "processes if BN was synchronized), for the small-batch rule (default: a bnlab run's own batch size)",
    )  # fmt: skip
    p.add_argument("--strict", action="store_true", help="exit 1 on warnings too")
    common(p)
    p.set_defaults(func=cmd_check)

    p = sub.add_parser(
        "bench",
        help="speed: bnlab's BN layer vs PyTorch's, and the seed experiment's training speed",
        description="Time bnlab's batch norm against PyTorch's, and the 800-batch seed experiment per BN mode.",
    )
    p.add_argument(
        "what", nargs="?", choices=("all", "layer", "train"), default="all", help="what to time (default: all)"
    )
    p.add_argument("--bn", type=csv_choices(BN_MODES), default=",".join(BN_MODES), help="modes (default: all three)")
    p.add_argument(
        "--paths", type=csv_choices(("fast", "slow")), default="fast",
        help="fast (default path) and/or slow (--no-fast) training path (default: fast)",
    )  # fmt: skip
    p.add_argument("--runs", type=repeats_int, default=3, help="800-batch runs per mode (default: 3)")
    p.add_argument("--repeats", type=repeats_int, default=30, help="timings per layer shape (default: 30)")
    p.add_argument("--out", metavar="FILE", help="also write the results as JSON to FILE (checked before timing)")
    common(p)
    p.set_defaults(func=cmd_bench)
