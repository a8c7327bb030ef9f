"""Argument types and options shared by every command: ranges checked up front, outputs checked before work."""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from bnlab.config import MAX_BATCHES, MAX_SEED
from bnlab.data import VALIDATION_SIZE
from bnlab.errors import UsageError

DATA_HELP = "folder holding the four MNIST files (default: $BNLAB_DATA_DIR, else download to ~/.cache/bnlab)"


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        """One line and exit status 2, instead of argparse's usage dump."""
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


KIND_NAMES = {int: "a whole number", float: "a number"}


def number(kind: type, minimum: float, maximum: float = math.inf, inclusive: bool = True) -> Callable[[str], Any]:
    """An argparse type: ``kind`` in [minimum, maximum] (minimum excluded unless ``inclusive``), finite."""

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {KIND_NAMES[kind]}, got {text!r}") from None
        if not math.isfinite(value) or (value < minimum if inclusive else value <= minimum):
            raise argparse.ArgumentTypeError(f"must be {'>=' if inclusive else '>'} {minimum}, got {text}")
        if value > maximum:
            raise argparse.ArgumentTypeError(f"must be <= {maximum:g}, got {text}")
        return value

    return parse


positive_int = number(int, 1, 10**8)
non_negative_int = number(int, 0, 10**8)
positive_float = number(float, 0.0, 1e6, inclusive=False)
batches_int = number(int, 1, MAX_BATCHES)
seed_int = number(int, 0, MAX_SEED)
seeds_count = number(int, 1, 100)  # seeds of an experiment: each is one or more whole runs
threads_int = number(int, 1, 1024)
repeats_int = number(int, 1, 10**4)  # timing repeats and benchmark runs
batch_size_int = number(int, 1, 60000 - VALIDATION_SIZE)  # at most the training images of one epoch
eval_size_int = number(int, 1, VALIDATION_SIZE)


def csv_choices(allowed: Sequence[str]) -> Callable[[str], str]:
    def parse(text: str) -> str:
        items = [item.strip() for item in text.split(",")]
        bad = [item for item in items if item not in allowed]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"expected a comma-separated subset of {','.join(allowed)}, got {text!r}")
        return ",".join(items)

    return parse


def common(p: argparse.ArgumentParser, data: bool = True) -> None:
    """--data-dir, --device and --json: every command takes them (--data-dir where it reads MNIST)."""
    if data:
        p.add_argument("--data-dir", metavar="DIR", help=DATA_HELP)
    p.add_argument("--device", default="auto", help="auto (GPU if present), cpu, cuda or cuda:N (default: auto)")
    p.add_argument("--json", action="store_true", help="print the results as JSON on stdout (logs go to stderr)")


def fast_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--no-fast",
        action="store_true",
        help="turn off the speed-ups (channels_last, fused Adam, compiled BN kernels), e.g. to debug",
    )


def store_options(p: argparse.ArgumentParser) -> None:
    """--fresh and --runs: every lab command keeps its runs in a run store (``bnlab.training.runs``)."""
    p.add_argument("--fresh", action="store_true", help="retrain every run, even where a finished one exists")
    p.add_argument(
        "--runs", metavar="DIR", help="the run store to keep runs in (default: OUT/runs); share it between commands"
    )


def store_arguments(args: argparse.Namespace) -> dict[str, Any]:
    """The lab functions' ``policy`` and ``runs_dir`` from --fresh and --runs (checked writable now)."""
    return {
        "policy": "fresh" if args.fresh else "reuse",
        "runs_dir": writable_folder(args.runs, "--runs") if args.runs else None,
    }


def threads_option(p: argparse.ArgumentParser) -> None:
    """--threads: torch threads for a long lab command (``apply_threads`` sets them)."""
    p.add_argument("--threads", type=threads_int, help="torch threads (default: torch's; 1 is faster on a busy CPU)")


def apply_threads(args: argparse.Namespace) -> None:
    """On a loaded machine one thread per process can be many times faster than two."""
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)


def emitter(args: argparse.Namespace) -> Callable[[str], None]:
    """Where human-readable lines go: stdout, or stderr when stdout carries JSON."""
    return (lambda line: print(line, file=sys.stderr)) if args.json else print


def writable_folder(path: str | Path, option: str = "--out") -> Path:
    """``path`` as an output folder, created if needed and proven writable now, before any long work."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UsageError(f"{path} exists and is not a folder; choose another {option}")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as err:
        raise UsageError(f"cannot write to {path} ({err.strerror or err}); choose another {option}") from None
    return path


def writable_file(path: str | Path, overwrite: bool = True) -> Path:
    """``path`` as an output file whose folder is writable now, before any long work."""
    path = Path(path)
    if path.is_dir():
        raise UsageError(f"{path} is a folder; give a file name")
    if path.exists() and not overwrite:
        raise UsageError(f"{path} exists; choose another name, or pass --overwrite to replace it")
    folder = path.parent
    if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
        raise UsageError(f"cannot write {path}: its folder {folder} does not exist or is not writable")
    writable_folder(folder)
    return path
