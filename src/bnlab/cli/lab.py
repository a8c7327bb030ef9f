"""``bnlab reproduce``, ``benefits``, ``family``, ``rnn`` and ``precise``: the experiments, each writing a report
folder."""

from __future__ import annotations

import argparse
import json

from bnlab.cli.args import (
    apply_threads,
    batches_int,
    common,
    csv_choices,
    emitter,
    eval_size_int,
    fast_flag,
    non_negative_int,
    number,
    positive_float,
    positive_int,
    seeds_count,
    store_arguments,
    store_options,
    threads_option,
    writable_folder,
)
from bnlab.config import BN_MODES, TASKS
from bnlab.errors import UsageError


def cmd_reproduce(args: argparse.Namespace) -> int:
    from bnlab.lab.reproduce import reproduce, reproduce_table

    emit = emitter(args)
    outcome = reproduce(
        args.seeds,
        out_dir=writable_folder(args.out),
        data_dir=args.data_dir,
        device=args.device,
        **store_arguments(args),
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


def cmd_benefits(args: argparse.Namespace) -> int:
    from bnlab.lab.benefits import run_benefits

    emit = emitter(args)
    outcome = run_benefits(
        args.claims,
        budget=args.budget,
        seeds=args.seeds,
        out_dir=writable_folder(args.out),
        bn=args.bn,
        data_dir=args.data_dir,
        device=args.device,
        log=emit,
        workers=args.workers,
        **store_arguments(args),
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


def cmd_family(args: argparse.Namespace) -> int:
    from bnlab.lab.family import run_family

    emit = emitter(args)
    outcome = run_family(
        args.budget,
        args.seeds,
        out_dir=writable_folder(args.out),
        data_dir=args.data_dir,
        device=args.device,
        workers=args.workers,
        **store_arguments(args),
        log=emit,
    )
    emit("")
    for finding in outcome.findings():
        emit(f"- {finding}")
    emit(f"\nWritten to {outcome.out_dir}: report.md, results.json, results.csv, family.png")
    if args.json:
        result = outcome.to_dict()
        print(json.dumps({"out_dir": str(outcome.out_dir)} | {k: result[k] for k in ("budget", "table", "findings")}))
    return 0


def cmd_rnn(args: argparse.Namespace) -> int:
    from bnlab.lab.rnn import rnn_table, run_rnn

    apply_threads(args)
    emit = emitter(args)
    outcome = run_rnn(
        args.task,
        args.seeds,
        batches=args.batches,
        minutes=args.minutes,
        out_dir=writable_folder(args.out),
        data_dir=args.data_dir,
        device=args.device,
        eval_every=args.eval_every,
        eval_size=args.eval_size,
        one_at_a_time=args.one_at_a_time,
        precise_samples=args.precise_samples,
        checkpoint_every=args.checkpoint_every,
        **store_arguments(args),
        log=emit,
    )
    emit("")
    emit(rnn_table(outcome))
    emit("")
    emit(f"Written to {outcome.out_dir}: report.md, table.md, results.csv, results.json, validation_accuracy.png")
    if args.json:
        rows = {"task": outcome.task, "rows": outcome.rows(), "pairs": outcome.pairs(), "out_dir": str(outcome.out_dir)}
        print(json.dumps(rows, indent=2))
    return 0


def cmd_precise(args: argparse.Namespace) -> int:
    from bnlab.lab.precise import run_precise

    apply_threads(args)
    emit = emitter(args)
    outcome = run_precise(
        args.budget,
        args.seeds,
        modes=args.modes.split(","),
        out_dir=writable_folder(args.out),
        data_dir=args.data_dir,
        device=args.device,
        **store_arguments(args),
        log=emit,
    )
    emit("")
    for finding in outcome.findings():
        emit(f"- {finding}")
    emit(f"\nWritten to {outcome.out_dir}: report.md, results.json, results.csv, precise.png")
    if args.json:
        print(json.dumps({"out_dir": str(outcome.out_dir)} | outcome.to_dict(), indent=2))
    return 0


def _claim_list(text: str) -> list[int]:
    from bnlab.lab.benefits import parse_claims

    try:
        return parse_claims(text)
    except UsageError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def add_commands(sub: argparse._SubParsersAction) -> None:
    from bnlab.lab.benefits import BUDGETS, CLAIMS

    p = sub.add_parser(
        "reproduce",
        help="the notebook's experiment: no BN vs PyTorch BN vs bnlab BN",
        description="Train the three networks at the notebook's settings and compare them with its published "
        "figures, with the running (EMA) statistics and with precise ones.",
    )
    p.add_argument("--seeds", type=seeds_count, default=1, help="seeds 0..N-1 per network (default: 1)")
    p.add_argument("--out", metavar="DIR", default="runs/reproduce", help="output folder (default: runs/reproduce)")
    store_options(p)
    common(p)
    fast_flag(p)
    p.set_defaults(func=cmd_reproduce)

    p = sub.add_parser(
        "benefits",
        help="the seven claimed benefits of batch norm, each put to a paired test, with a report",
        description="Run one paired experiment per claim (with and without BN, same initial weights and batches, "
        "several seeds) and write report.md, report.html, results.json and figures. Finished runs are reused "
        "(--fresh retrains them).",
    )
    p.add_argument(
        "--claims", type=_claim_list, default=list(CLAIMS), metavar="LIST",
        help="claims to test, e.g. 1,3-5 (default: all seven)",
    )  # fmt: skip
    p.add_argument(
        "--budget", choices=list(BUDGETS), default="quick",
        help="; ".join(f"{name}: {budget.runtime}" for name, budget in BUDGETS.items()) + " (default: quick)",
    )  # fmt: skip
    p.add_argument("--seeds", type=seeds_count, help="seeds 0..N-1 (default: the budget's, 1/2/5)")
    p.add_argument(
        "--bn", choices=BN_MODES[1:], default="manual", help="the BN arm: torch or manual (bnlab's; default)"
    )
    p.add_argument("--out", metavar="DIR", default="runs/benefits", help="output folder (default: runs/benefits)")
    p.add_argument(
        "--workers", type=number(int, 1, 256), metavar="N",
        help="train in N processes side by side, one thread each (default: one per usable CPU core)",
    )  # fmt: skip
    store_options(p)
    common(p)
    p.set_defaults(func=cmd_benefits)

    from bnlab.lab.family import BUDGETS as FAMILY_BUDGETS

    p = sub.add_parser(
        "family",
        help="which normalization at which batch size: BN, renorm, ghost, GroupNorm, synced BN, none",
        description="Train batch norm's small-batch family side by side (paired runs, batch sizes 2-128 and "
        "non-i.i.d. batches, several seeds) and write report.md (a verdict table under a rule fixed before the "
        "runs), results.json, results.csv and family.png (test error against batch size, as Wu & He's Figure 1). "
        "Finished runs are reused (--fresh retrains them).",
    )
    p.add_argument(
        "--budget", choices=list(FAMILY_BUDGETS), default="quick",
        help="; ".join(f"{name}: {b.runtime}" for name, b in FAMILY_BUDGETS.items()) + " (default: quick)",
    )  # fmt: skip
    p.add_argument("--seeds", type=seeds_count, help="seeds 0..N-1 (default: the budget's, 1/2/3)")
    p.add_argument("--out", metavar="DIR", default="runs/family", help="output folder (default: runs/family)")
    p.add_argument(
        "--workers", type=number(int, 1, 256), metavar="N",
        help="train in N processes side by side, one thread each (default: one per usable CPU core)",
    )  # fmt: skip
    store_options(p)
    common(p)
    p.set_defaults(func=cmd_family)

    p = sub.add_parser(
        "rnn",
        help="recurrent batch norm: LSTM vs BN-LSTM on sequential MNIST (Cooijmans et al.)",
        description="Train the LSTM and the BN-LSTM from the same initial weights on the same batches at the "
        "paper's settings (RMSProp 1e-3, momentum 0.9, clipping 1.0, batch 100, 100 units) and write validation "
        "curves, a table with test accuracy and the one-at-a-time check, CSV/JSON and report.md. Finished runs are "
        "reused; interrupted ones resume from their last checkpoint.",
    )
    p.add_argument(
        "--task", choices=TASKS, default="row",
        help="row: 28 steps of 28 pixels; pixel: 784 steps of 1; permuted: pMNIST (default: row)",
    )  # fmt: skip
    p.add_argument(
        "--batches", type=batches_int,
        help="training batches per run (default: 3000, unlimited with --minutes; with both, whichever ends first)",
    )  # fmt: skip
    p.add_argument(
        "--minutes", type=positive_float, help="training time per run, evaluation excluded (default: no limit)"
    )
    p.add_argument("--seeds", type=seeds_count, default=1, help="seeds 0..N-1, each a pair of runs (default: 1)")
    p.add_argument("--eval-every", type=positive_int, default=100, help="batches between evaluations (default: 100)")
    p.add_argument(
        "--eval-size", type=eval_size_int, default=1000, help="validation images per evaluation (default: 1000)"
    )
    p.add_argument(
        "--one-at-a-time", type=non_negative_int, default=100, metavar="N",
        help="test images classified alone at the end (default: 100)",
    )  # fmt: skip
    p.add_argument(
        "--precise-samples", type=non_negative_int, default=8192, metavar="N",
        help="training images for the BN-LSTM's precise statistics at the end, 0 for none (default: 8192)",
    )  # fmt: skip
    p.add_argument(
        "--checkpoint-every", type=non_negative_int, default=200, metavar="N",
        help="a resumable checkpoint every N batches, 0 for only at the end (default: 200)",
    )  # fmt: skip
    threads_option(p)
    p.add_argument("--out", metavar="DIR", default="runs/rnn", help="output folder (default: runs/rnn)")
    store_options(p)
    common(p)
    p.set_defaults(func=cmd_rnn)

    p = sub.add_parser(
        "precise",
        help="when do you need precise BN statistics, and from how many samples",
        description="Train the notebook's ConvNet with PyTorch's and bnlab's BN at EMA decay 0.9, 0.99 and 0.999, "
        "score snapshots (after 200, 800 and, in the full budget, 3,000 batches) with the running (EMA) statistics and "
        "with precise ones, "
        "sweep the samples precise statistics are drawn from, and write report.md, results.json, results.csv and "
        "figures. Finished runs and their scores are reused.",
    )
    p.add_argument(
        "--budget", choices=["smoke", "quick", "full"], default="quick",
        help="smoke: seconds, for CI; quick: 1 seed, 800 batches; full: 3 seeds, 3,000 batches, 6 sample counts "
        "(default: quick)",
    )  # fmt: skip
    p.add_argument("--seeds", type=seeds_count, help="seeds 0..N-1 (default: the budget's, 1/1/3)")
    p.add_argument(
        "--modes", type=csv_choices(BN_MODES[1:]), default="torch,manual", help="BN modes (default: torch,manual)"
    )
    threads_option(p)
    p.add_argument("--out", metavar="DIR", default="runs/precise", help="output folder (default: runs/precise)")
    store_options(p)
    common(p)
    p.set_defaults(func=cmd_precise)
