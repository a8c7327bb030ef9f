"""The ``bnlab`` command.

Exit status: 0 success, 1 a problem bnlab explains (missing data, a diverged run, ...), 2 bad usage,
130 interrupted. Errors are one line on stderr; results go to stdout (``--json`` for machines).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from bnlab import __version__
from bnlab.errors import BnlabError, UsageError
from bnlab.models import BN_MODES

DATA_HELP = "folder holding the four MNIST files (default: $BNLAB_DATA_DIR, else download to ~/.cache/bnlab)"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        """One line and exit status 2, instead of argparse's usage dump."""
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def _number(kind: type, minimum: float, inclusive: bool = True) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {kind.__name__}, got {text!r}") from None
        too_small = value < minimum if inclusive else value <= minimum
        if too_small or not math.isfinite(value):
            bound = f">= {minimum}" if inclusive else f"> {minimum}"
            raise argparse.ArgumentTypeError(f"must be {bound}, got {text}")
        return value

    return parse


positive_int = _number(int, 1)
non_negative_int = _number(int, 0)
positive_float = _number(float, 0.0, inclusive=False)


def _emit(args: argparse.Namespace) -> Callable[[str], None]:
    """Where human-readable lines go: stdout, or stderr when stdout carries JSON."""
    return (lambda line: print(line, file=sys.stderr)) if args.json else print


def cmd_train(args: argparse.Namespace) -> int:
    from bnlab.training.loop import TrainConfig, train

    config = TrainConfig(
        bn=args.bn, batches=args.batches, batch_size=args.batch_size, lr=args.lr, loss=args.loss, seed=args.seed
    )
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = Path(args.out) if args.out else Path("runs/train") / f"{args.bn}-seed{args.seed}-{stamp}"
    if out.exists() and any(out.iterdir()):
        raise UsageError(f"{out} is not empty; choose another --out (or remove that folder)")
    emit = _emit(args)
    result = train(config, run_dir=out, data_dir=args.data_dir, device=args.device, log=emit, fast=not args.no_fast)
    emit(f"Run written to {out} (wall time {result.wall_seconds:.1f} s)")
    if args.json:
        print(json.dumps(result.summary() | {"run_dir": str(out)}, indent=2))
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from bnlab.data import load_mnist
    from bnlab.training.loop import evaluate, load_model, one_at_a_time_accuracy, resolve_device

    device = resolve_device(args.device)
    model, payload = load_model(args.checkpoint, device)
    data = load_mnist(args.data_dir).to(device)
    loss = payload["config"]["loss"]
    val_loss, val_acc = evaluate(model, data.validation, loss)
    test_loss, test_acc = evaluate(model, data.test, loss)
    one = one_at_a_time_accuracy(model, data.test, args.samples) if args.samples else None
    result = {
        "checkpoint": str(args.checkpoint),
        "config": payload["config"],
        "validation_loss": val_loss,
        "validation_accuracy": val_acc,
        "test_loss": test_loss,
        "test_accuracy": test_acc,
        "one_at_a_time_samples": args.samples,
        "one_at_a_time_accuracy": one,
    }
    emit = _emit(args)
    cfg = payload["config"]
    emit(f"Checkpoint {args.checkpoint}: bn={cfg['bn']}, seed {cfg['seed']}, {cfg['batches']} batches")
    emit(f"Validation accuracy: {val_acc:.5f}")
    emit(f"Test accuracy: {test_acc:.5f}")
    if one is not None:
        emit(f"Accuracy on {args.samples} samples (one at a time): {one}")
        if one < test_acc - 0.2:
            emit(
                "Warning: one-at-a-time accuracy is far below test accuracy; population statistics "
                "were probably not tracked or not used."
            )
    if args.json:
        print(json.dumps(result, indent=2))
    return 0


def cmd_reproduce(args: argparse.Namespace) -> int:
    from bnlab.lab.reproduce import reproduce, reproduce_table

    emit = _emit(args)
    outcome = reproduce(
        args.seeds,
        out_dir=args.out,
        data_dir=args.data_dir,
        device=args.device,
        reuse=not args.fresh,
        log=emit,
        fast=not args.no_fast,
    )
    emit("")
    emit(reproduce_table(outcome))
    emit("")
    emit(f"Written to {outcome.out_dir}: table.md, results.csv, results.json, validation_accuracy.png")
    if args.json:
        print(json.dumps({"rows": outcome.rows(), "out_dir": str(outcome.out_dir)}, indent=2))
    return 0


def cmd_summary(args: argparse.Namespace) -> int:
    from bnlab.models import build_model, summary

    print(summary(build_model(args.bn, depth=args.depth, activation=args.activation)))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from bnlab import bench
    from bnlab.training import runs

    emit = _emit(args)
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
    if args.out:
        runs.write_json(Path(args.out), out)
        emit(f"\nWritten to {args.out}")
    if args.json:
        print(json.dumps(out, indent=2))
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from bnlab.check import check_model, load_model_spec

    if str(Path.cwd()) not in sys.path:  # as with `python -m`: MODEL's module may sit in the current folder
        sys.path.insert(0, str(Path.cwd()))
    model = load_model_spec(args.model, args.device)
    report = check_model(model, samples=args.samples, data_dir=args.data_dir)
    emit = _emit(args)
    emit(f"bnlab check {args.model} ({type(model).__name__})")
    emit(report.format())
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    return 1 if report.errors or (args.strict and report.warnings) else 0


def cmd_benefits(args: argparse.Namespace) -> int:
    from bnlab.lab.benefits import run_benefits

    emit = _emit(args)
    outcome = run_benefits(
        args.claims,
        budget=args.budget,
        seeds=args.seeds,
        out_dir=args.out,
        bn=args.bn,
        data_dir=args.data_dir,
        device=args.device,
        log=emit,
    )
    emit("")
    for claim in outcome.claims:
        emit(f"{claim.number}. {claim.title}: {claim.verdict}. {claim.headline}")
    emit(
        f"\nWritten to {outcome.out_dir}: report.md, report.html, results.json, figures ({outcome.wall_seconds:.0f} s)"
    )
    if args.json:
        claims = [{k: c.to_dict()[k] for k in ("claim", "title", "verdict", "headline")} for c in outcome.claims]
        print(json.dumps({"out_dir": str(outcome.out_dir), "budget": args.budget, "claims": claims}, indent=2))
    return 0


def _claim_list(text: str) -> list[int]:
    from bnlab.lab.benefits import parse_claims

    try:
        return parse_claims(text)
    except UsageError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _csv_choices(allowed: Sequence[str]) -> Callable[[str], str]:
    def parse(text: str) -> str:
        items = [item.strip() for item in text.split(",")]
        bad = [item for item in items if item not in allowed]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"expected a comma-separated subset of {','.join(allowed)}, got {text!r}")
        return ",".join(items)

    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="bnlab", description="Batch normalization you can run, see and trust.")
    parser.add_argument("--version", action="version", version=f"bnlab {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser, required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--data-dir", metavar="DIR", help=DATA_HELP)
        p.add_argument("--device", default="auto", help="auto (GPU if present), cpu, cuda or cuda:N (default: auto)")
        p.add_argument("--json", action="store_true", help="print the results as JSON on stdout (logs go to stderr)")

    def fast_flag(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--no-fast",
            action="store_true",
            help="turn off the speed-ups (channels_last, fused Adam, compiled BN kernels), e.g. to debug",
        )

    p = sub.add_parser(
        "train",
        help="train the seed ConvNet once, as the notebook does",
        description="Train the 20-layer ConvNet on MNIST with the notebook's procedure.",
    )
    p.add_argument(
        "--bn",
        choices=BN_MODES,
        default="manual",
        help="none; torch = nn.BatchNorm; manual = bnlab's own BN (default: manual)",
    )
    p.add_argument("--batches", type=positive_int, default=800, help="training batches (default: 800)")
    p.add_argument("--batch-size", type=positive_int, default=64, help="examples per batch (default: 64)")
    p.add_argument("--lr", type=positive_float, default=0.002, help="Adam learning rate (default: 0.002)")
    p.add_argument(
        "--loss",
        choices=("sigmoid", "softmax"),
        default="sigmoid",
        help="sigmoid (the notebook's) or softmax cross-entropy (default: sigmoid)",
    )
    p.add_argument("--seed", type=non_negative_int, default=0, help="seed for weights and batches (default: 0)")
    p.add_argument("--out", metavar="DIR", help="run directory to create (default: runs/train/BN-seedS-TIME)")
    common(p)
    fast_flag(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser(
        "reproduce",
        help="the notebook's experiment: no BN vs PyTorch BN vs bnlab BN",
        description="Train the three networks at the notebook's settings and compare them with its published figures.",
    )
    p.add_argument("--seeds", type=positive_int, default=1, help="seeds 0..N-1 per network (default: 1)")
    p.add_argument("--out", metavar="DIR", default="runs/reproduce", help="output folder (default: runs/reproduce)")
    p.add_argument("--fresh", action="store_true", help="retrain even where a finished run exists")
    common(p)
    fast_flag(p)
    p.set_defaults(func=cmd_reproduce)

    p = sub.add_parser(
        "evaluate",
        help="score a saved run, including the one-at-a-time check",
        description="Reload a checkpoint and score it on validation, test, and test samples classified one at a time.",
    )
    p.add_argument("checkpoint", metavar="RUN_DIR_OR_CHECKPOINT", help="a run directory or its checkpoint.pt")
    p.add_argument(
        "--samples", type=non_negative_int, default=100, help="test images to classify one at a time (default: 100)"
    )
    common(p)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser(
        "summary",
        help="print the seed ConvNet's layers, shapes and parameter counts",
        description="Print a summary of the seed ConvNet.",
    )
    p.add_argument("--bn", choices=BN_MODES, default="manual", help="normalization (default: manual)")
    p.add_argument("--depth", type=positive_int, default=19, help="conv layers (default: 19)")
    p.add_argument("--activation", default="relu", help="activation function (default: relu)")
    p.set_defaults(func=cmd_summary)

    p = sub.add_parser(
        "bench",
        help="speed: bnlab's BN layer vs PyTorch's, and the seed experiment's training speed",
        description="Time bnlab's batch norm against PyTorch's, and the 800-batch seed experiment per BN mode.",
    )
    p.add_argument(
        "what", nargs="?", choices=("all", "layer", "train"), default="all", help="what to time (default: all)"
    )
    p.add_argument("--bn", type=_csv_choices(BN_MODES), default=",".join(BN_MODES), help="modes (default: all three)")
    p.add_argument(
        "--paths",
        type=_csv_choices(("fast", "slow")),
        default="fast",
        help="fast (default path) and/or slow (--no-fast) training path (default: fast)",
    )
    p.add_argument("--runs", type=positive_int, default=3, help="800-batch runs per mode (default: 3)")
    p.add_argument("--repeats", type=positive_int, default=30, help="timings per layer shape (default: 30)")
    p.add_argument("--out", metavar="FILE", help="also write the results as JSON to FILE")
    common(p)
    p.set_defaults(func=cmd_bench)

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
        "--samples", type=positive_int, default=100, help="test images scored alone and in a batch (default: 100)"
    )
    p.add_argument("--strict", action="store_true", help="exit 1 on warnings too")
    common(p)
    p.set_defaults(func=cmd_check)

    from bnlab.lab.benefits import BUDGETS, CLAIMS

    p = sub.add_parser(
        "benefits",
        help="the seven claimed benefits of batch norm, each put to a paired test, with a report",
        description="Run one paired experiment per claim (with and without BN, same initial weights and batches, "
        "several seeds) and write report.md, report.html, results.json and figures. Finished runs are reused.",
    )
    p.add_argument(
        "--claims",
        type=_claim_list,
        default=list(CLAIMS),
        metavar="LIST",
        help="claims to test, e.g. 1,3-5 (default: all seven)",
    )
    p.add_argument(
        "--budget",
        choices=list(BUDGETS),
        default="quick",
        help="smoke: seconds, for CI; quick: about 7 min on 2 CPU cores; full: about 2 h 40 min (default: quick)",
    )
    p.add_argument("--seeds", type=positive_int, help="seeds 0..N-1 (default: the budget's, 1/2/5)")
    p.add_argument("--bn", choices=BN_MODES[1:], default="torch", help="batch norm: torch or manual (default: torch)")
    p.add_argument("--out", metavar="DIR", default="runs/benefits", help="output folder (default: runs/benefits)")
    common(p)
    p.set_defaults(func=cmd_benefits)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except UsageError as err:
        print(f"bnlab {args.command}: error: {err}", file=sys.stderr)
        return 2
    except BnlabError as err:
        print(f"bnlab {args.command}: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"bnlab {args.command}: interrupted; files already written are intact", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
