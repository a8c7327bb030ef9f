"""``bnlab reproduce`` and ``bnlab benefits``: the experiments, each writing a report folder."""

from __future__ import annotations

import argparse
import json

from bnlab.cli.args import common, emitter, fast_flag, positive_int, writable_folder
from bnlab.config import BN_MODES
from bnlab.errors import UsageError


def cmd_reproduce(args: argparse.Namespace) -> int:
    from bnlab.lab.reproduce import reproduce, reproduce_table

    emit = emitter(args)
    outcome = reproduce(
        args.seeds,
        out_dir=writable_folder(args.out),
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


def add_commands(sub: argparse._SubParsersAction) -> None:
    from bnlab.lab.benefits import BUDGETS, CLAIMS

    p = sub.add_parser(
        "reproduce",
        help="the notebook's experiment: no BN vs PyTorch BN vs bnlab BN",
        description="Train the three networks at the notebook's settings and compare them with its published "
        "figures, with the running (EMA) statistics and with precise ones.",
    )
    p.add_argument("--seeds", type=positive_int, default=1, help="seeds 0..N-1 per network (default: 1)")
    p.add_argument("--out", metavar="DIR", default="runs/reproduce", help="output folder (default: runs/reproduce)")
    p.add_argument("--fresh", action="store_true", help="retrain even where a finished run exists")
    common(p)
    fast_flag(p)
    p.set_defaults(func=cmd_reproduce)

    p = sub.add_parser(
        "benefits",
        help="the seven claimed benefits of batch norm, each put to a paired test, with a report",
        description="Run one paired experiment per claim (with and without BN, same initial weights and batches, "
        "several seeds) and write report.md, report.html, results.json and figures. Finished runs are reused.",
    )
    p.add_argument(
        "--claims", type=_claim_list, default=list(CLAIMS), metavar="LIST",
        help="claims to test, e.g. 1,3-5 (default: all seven)",
    )  # fmt: skip
    p.add_argument(
        "--budget", choices=list(BUDGETS), default="quick",
        help="smoke: seconds, for CI; quick: about 7 min on 2 CPU cores; full: about 2 h 40 min (default: quick)",
    )  # fmt: skip
    p.add_argument("--seeds", type=positive_int, help="seeds 0..N-1 (default: the budget's, 1/2/5)")
    p.add_argument(
        "--bn", choices=BN_MODES[1:], default="manual", help="the BN arm: torch or manual (bnlab's; default)"
    )
    p.add_argument("--out", metavar="DIR", default="runs/benefits", help="output folder (default: runs/benefits)")
    common(p)
    p.set_defaults(func=cmd_benefits)
