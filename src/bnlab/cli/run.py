"""``bnlab train``, ``evaluate``, ``recalibrate``, ``fold`` and ``summary``: one network at a time."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from bnlab.cli.args import (
    batch_size_int,
    batches_int,
    common,
    emitter,
    fast_flag,
    non_negative_int,
    number,
    positive_float,
    seed_int,
    writable_file,
)
from bnlab.config import ACTIVATIONS, BN_MODES, LOSSES, NORMS, TrainConfig
from bnlab.errors import BnlabError, UsageError

BN_HELP = (
    "none; torch = nn.BatchNorm; manual = bnlab's own BN (default); renorm, ghost (needs --virtual-batch), group: "
    "the small-batch family (docs/family.md)"
)
number_at_least_2 = number(int, 2, 10**8)


def cmd_train(args: argparse.Namespace) -> int:
    from bnlab.training import distributed

    try:
        return _train_command(args)
    except KeyboardInterrupt:
        if distributed.launched():
            return distributed.INTERRUPTED  # a worker of --nproc: its launcher says so, once for the job
        raise


def _train_command(args: argparse.Namespace) -> int:
    from bnlab.training import distributed, resolve_device, store, train

    emit = emitter(args)
    workers = distributed.workers_to_start(args.nproc, args.oversubscribe)
    if args.resume:
        if not args.out:
            raise UsageError("--resume needs --out, the run directory to continue")
        out = Path(args.out)
        store.require_run(out)
        config = store.read_config(out)
        emit(f"Resuming {out} (bn={config.bn}, seed {config.seed}, {config.batches} batches)")
    else:
        config = TrainConfig(
            bn=args.bn, virtual_batch=args.virtual_batch, renorm_warmup=_renorm_warmup(args),
            batches=args.batches, batch_size=args.batch_size,
            lr=args.lr, loss=args.loss, seed=args.seed,
            checkpoint_every=args.checkpoint_every, precise_samples=args.precise_samples,
        )  # fmt: skip
        out = Path(args.out) if args.out else store.default_run_dir("runs/train", config)
    device = resolve_device(args.device)
    if workers and config.bn == "ghost":
        raise UsageError("--bn ghost has no synchronized form (each virtual batch is its own); use --nproc 1")
    if workers:
        return _launch(args, workers, out)
    world = distributed.from_env(device)
    main = world is None or world.is_main
    try:
        result = train(
            config, run_dir=out, resume=args.resume, data_dir=args.data_dir, device=device,
            log=emit if main else (lambda _: None), fast=not args.no_fast, world=world,
        )  # fmt: skip
    except Exception as err:
        broken = distributed.peer_failure(err) if world is not None else None
        if broken is None:
            raise
        if distributed.launched():
            return distributed.PEER_FAILED  # its launcher names the worker that failed
        failure = f"another process of this job failed, which broke the connection to it ({broken})"
        if main:
            store.record_end(out, "failed", failure)
        raise BnlabError(f"{failure}; that process's own output says why") from None
    if main:
        emit(f"Run written to {out} (wall time {result.wall_seconds:.1f} s)")
        if args.json:
            print(json.dumps(result.summary() | {"run_dir": str(out)}, indent=2))
    return 0


def _renorm_warmup(args: argparse.Namespace) -> int | None:
    """--renorm-warmup, by default a fifth of the run (the layer's 10,000 steps would outlast most runs)."""
    if args.bn != "renorm":
        if args.renorm_warmup is not None:
            raise UsageError("--renorm-warmup goes with --bn renorm")
        return None
    return args.batches // 5 if args.renorm_warmup is None else args.renorm_warmup


def _launch(args: argparse.Namespace, workers: int, out: Path) -> int:
    """--nproc N: make the checks that one process makes before it trains, then start the workers and wait."""
    from bnlab.cli import main
    from bnlab.data import fetch_mnist
    from bnlab.training import distributed, store

    (store.RunDir.resume(out)[0] if args.resume else store.RunDir.create(out)).close()  # rank 0 reopens it
    fetch_mnist(args.data_dir)  # once, rather than by every worker (a download would race)
    emitter(args)(f"Training on {workers} processes (gloo on CPU, nccl on CUDA); rank 0 writes {out}")
    try:
        return distributed.launch(workers, main, [*_without_nproc(args.argv), "--out", str(out)])
    except distributed.WorkerFailed as err:
        store.record_end(out, "failed", f"{err}; the job stopped")
        hint = f" Its last checkpoint stays valid: `bnlab train --resume --out {out} --nproc {workers}`."
        raise BnlabError(f"{err}; the job stopped.{hint if (out / store.CHECKPOINT).is_file() else ''}") from None
    except KeyboardInterrupt:
        store.record_end(out, "interrupted", "interrupted; the workers were stopped")
        raise


LAUNCHER_OPTIONS = {"--nproc": True, "--oversubscribe": False, "--out": True}  # option: whether it takes a value


def _without_nproc(argv: list[str]) -> list[str]:
    """The command line minus the launcher's own options, --nproc N and --oversubscribe (and --out, which the
    launcher passes explicitly), however abbreviated: what each worker runs."""
    out, skip = [], False
    for token in argv:
        name = token.split("=", 1)[0]
        option = next((o for o in LAUNCHER_OPTIONS if len(name) > 2 and o.startswith(name)), None)
        if skip:
            skip = False
        elif option is None:
            out.append(token)
        else:
            skip = LAUNCHER_OPTIONS[option] and "=" not in token
    return out


def cmd_evaluate(args: argparse.Namespace) -> int:
    from bnlab.data import load_mnist
    from bnlab.nn import is_batch_norm
    from bnlab.training import load_model, resolve_device
    from bnlab.training.scores import precise_copy, score_lines, scores, training_split

    device = resolve_device(args.device)
    checkpoint = load_model(args.checkpoint, device)
    config, model = checkpoint.config, checkpoint.model
    data = load_mnist(args.data_dir).to(device)
    samples = min(args.samples, len(data.test))
    stored = scores(model, data, config.loss, samples)
    kind = checkpoint.payload.get("statistics", {}).get("kind", "EMA")
    result: dict[str, Any] = {
        "checkpoint": str(checkpoint.path),
        "config": config.to_dict(),
        **checkpoint.provenance(),  # the step the weights come from, and whether the run finished
        "one_at_a_time_samples": samples,
        "statistics": kind,  # the scores below use the checkpoint's own statistics
        **stored,
        "precise": None,  # the same scores with precise statistics
    }
    emit = emitter(args)
    emit(f"Checkpoint {checkpoint.path}: {checkpoint.describe()}")
    if any(is_batch_norm(m) for m in model.modules()) and args.precise_samples:
        split = training_split(config, data)
        precise, done = precise_copy(model, split, args.precise_samples, config.batch_size, config.seed)
        result["precise"] = scores(precise, data, config.loss, samples) | {
            "samples": done.samples,
            "seconds": done.seconds,
        }
        emit(f"Precise statistics: recomputed from {done.samples:,} training images in {done.seconds:.2f} s")
    for line in score_lines(stored, result["precise"], samples, kind, final=False):
        emit(line)
    if result["precise"] and result["precise"]["test_accuracy"] - stored["test_accuracy"] > 0.02:
        emit(f"The stored statistics cost test accuracy: `bnlab recalibrate {args.checkpoint}` writes precise ones.")
    if samples and stored.get("one_at_a_time_accuracy", 1.0) < stored["test_accuracy"] - 0.2:
        emit("Warning: one-at-a-time accuracy is far below test accuracy; population statistics were probably not "
             "tracked or not used.")  # fmt: skip
    if args.json:
        print(json.dumps(result, indent=2))
    return 0


def cmd_recalibrate(args: argparse.Namespace) -> int:
    from bnlab.data import load_mnist
    from bnlab.training import load_model, resolve_device, store
    from bnlab.training.scores import precise_copy, score_lines, scores, training_split

    device = resolve_device(args.device)
    checkpoint = load_model(args.checkpoint, device)
    config = checkpoint.config
    source = checkpoint.path
    out = Path(args.out) if args.out else source.with_name(f"{source.stem}-precise{source.suffix}")
    writable_file(out, overwrite=args.overwrite)
    if out.resolve() == source.resolve():
        raise UsageError(f"--out {out} is the checkpoint being recalibrated; write the result beside it")
    data = load_mnist(args.data_dir).to(device)
    emit = emitter(args)
    emit(f"Checkpoint {source}: {checkpoint.describe()}")
    with store.writing(out):  # one writer: a second recalibrate (or a run writing there) is refused
        writable_file(out, overwrite=args.overwrite)  # again, under the lock: a writer may have finished meanwhile
        samples = min(args.one_at_a_time, len(data.test))
        batch_size = args.batch_size or config.batch_size
        before = scores(checkpoint.model, data, config.loss, samples)
        model, done = precise_copy(
            checkpoint.model, training_split(config, data), args.samples, batch_size, config.seed
        )
        after = scores(model, data, config.loss, samples)
        statistics = {"kind": "precise", "samples": done.samples, "batch_size": batch_size, "from": source.name}
        payload = {
            key: value for key, value in checkpoint.payload.items() if key not in ("format", "version", "resume")
        }
        store.save_checkpoint(out, payload | {"state_dict": model.state_dict(), "statistics": statistics})
    emit(f"Recalibrated {len(done.layers)} BN layers from {done.samples:,} training images in {done.seconds:.2f} s")
    for line in score_lines(before, after, samples, kind="stored", final=False):
        emit(line)
    emit(f"Written to {out}")
    if args.json:
        report = {"checkpoint": str(source), "out": str(out), **checkpoint.provenance(), "before": before}
        report |= {"after": after, "samples": done.samples, "seconds": done.seconds, "layers": done.layers}
        print(json.dumps(report, indent=2))
    return 0


def cmd_fold(args: argparse.Namespace) -> int:
    import torch

    from bnlab.bench import median_pair
    from bnlab.data import load_mnist
    from bnlab.nn.fold import fold
    from bnlab.training import evaluate, load_model, resolve_device, store

    device = resolve_device(args.device)
    checkpoint = load_model(args.checkpoint, device)
    source, config = checkpoint.path, checkpoint.config
    out = Path(args.out) if args.out else source.with_name(f"{source.stem}-folded{source.suffix}")
    program_path = out.with_suffix(".pt2")
    for path in (out, program_path):
        writable_file(path, overwrite=args.overwrite)
    if out.resolve() == source.resolve():
        raise UsageError(f"--out {out} is the checkpoint being folded; write the result beside it")
    if checkpoint.payload.get("folded"):
        raise UsageError(f"{source} is already folded (written by bnlab fold)")
    data = load_mnist(args.data_dir).to(device)
    emit = emitter(args)
    emit(f"Checkpoint {source}: {checkpoint.describe()}")
    model = checkpoint.model.eval()
    images = data.test.images[: args.samples]
    result = fold(model, images[:8])
    with torch.inference_mode():
        reference, folded_out = model(images), result.model(images)
        difference = (folded_out - reference).abs().max().item()
        relative = difference / max(reference.abs().max().item(), 1e-30)
        before, after = (evaluate(m, data.test, config.loss)[1] for m in (model, result.model))
        latency = {}
        for batch in (1, 256):
            x = data.test.images[:batch]
            seconds = median_pair(lambda x=x: model(x), lambda x=x: result.model(x), args.repeats)
            latency[batch] = {
                "before_ms": seconds[0] * 1e3,
                "after_ms": seconds[1] * 1e3,
                "ratio": seconds[1] / seconds[0],
            }
    program = torch.export.export(
        result.model, (images[:8],), dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=1_000_000)},)
    )
    with store.writing(out):  # one writer, as recalibrate
        payload = {k: v for k, v in checkpoint.payload.items() if k not in ("format", "version", "resume")}
        store.save_checkpoint(out, payload | {"state_dict": result.model.state_dict(), "folded": result.folded})
        torch.export.save(program, program_path)
    emit(str(result))
    emit(f"Largest output difference on {len(images):,} test images: {difference:.3g} ({relative:.2g} relative)")
    emit(f"Test accuracy: {before:.5f} before, {after:.5f} after")
    for batch, t in latency.items():
        emit(f"Eval latency at batch {batch}: {t['before_ms']:.3f} ms before, {t['after_ms']:.3f} ms after "
             f"({t['ratio']:.2f}x; median of {args.repeats}, interleaved)")  # fmt: skip
    emit(f"Written to {out} and {program_path} (torch.export; load it with torch.export.load)")
    if args.json:
        report = {"checkpoint": str(source), "out": str(out), "program": str(program_path)}
        report |= {"folded": result.folded, "left": result.left, "max_difference": difference}
        report |= {"relative_difference": relative, "test_accuracy_before": before, "test_accuracy_after": after}
        print(json.dumps(report | {"latency": latency}, indent=2))
    return 0


def cmd_summary(args: argparse.Namespace) -> int:
    from bnlab.models import build_network, layer_rows, summary
    from bnlab.training import resolve_device

    config = TrainConfig(bn=args.bn, depth=args.depth, activation=args.activation)
    model = build_network(config).to(resolve_device(args.device))
    if args.json:
        print(json.dumps({"config": config.to_dict(), "layers": layer_rows(model)}, indent=2))
    else:
        print(summary(model))
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train the seed ConvNet once, as the notebook does",
        description="Train the 20-layer ConvNet on MNIST with the notebook's procedure; writes a run directory. "
        "At the end it scores the network with its running (EMA) statistics and with precise ones.",
    )
    p.add_argument("--bn", choices=NORMS, default="manual", help=BN_HELP)
    p.add_argument("--virtual-batch", type=number_at_least_2, metavar="N", help="--bn ghost: samples per virtual batch")
    p.add_argument(
        "--renorm-warmup", type=non_negative_int, metavar="N",
        help="--bn renorm: steps over which rmax and dmax open to 3 and 5 (default: a fifth of --batches)",
    )  # fmt: skip
    p.add_argument("--batches", type=batches_int, default=800, help="training batches (default: 800)")
    p.add_argument("--batch-size", type=batch_size_int, default=64, help="examples per batch (default: 64)")
    p.add_argument("--lr", type=positive_float, default=0.002, help="Adam learning rate (default: 0.002)")
    p.add_argument(
        "--loss", choices=LOSSES, default="sigmoid", help="sigmoid (the notebook's) or softmax cross-entropy"
    )
    p.add_argument("--seed", type=seed_int, default=0, help="seed for weights and batches, 0..2^63-1 (default: 0)")
    p.add_argument("--out", metavar="DIR", help="run directory to create (default: runs/train/BN-seedS-TIME-PID)")
    p.add_argument(
        "--checkpoint-every", type=non_negative_int, default=0, metavar="N",
        help="also save a resumable checkpoint every N batches (default: only at the end)",
    )  # fmt: skip
    p.add_argument(
        "--precise-samples", type=non_negative_int, default=8192, metavar="N",
        help="training images for the final scores with precise statistics; 0 skips them (default: 8192)",
    )  # fmt: skip
    p.add_argument("--resume", action="store_true", help="continue the stopped run in --out from its last checkpoint")
    p.add_argument(
        "--nproc", type=number(int, 1, 256), metavar="N",
        help="train data-parallel on N processes of this machine, synchronized BN (default: 1); at most one per "
        "usable CPU core; for several machines run the same command under torchrun instead",
    )  # fmt: skip
    p.add_argument(
        "--oversubscribe", action="store_true",
        help="allow --nproc above the usable CPU cores (workers then take turns on the cores; much slower)",
    )  # fmt: skip
    common(p)
    fast_flag(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser(
        "evaluate",
        help="score a saved run, with its stored statistics and with precise ones",
        description="Reload a checkpoint and score it on validation, test, and test samples classified one at a "
        "time: with the statistics it stores, and with precise statistics recomputed from training images.",
    )
    p.add_argument("checkpoint", metavar="RUN_DIR_OR_CHECKPOINT", help="a run directory or a checkpoint file")
    p.add_argument(
        "--samples", type=non_negative_int, default=100, help="test images to classify one at a time (default: 100)"
    )
    p.add_argument(
        "--precise-samples", type=non_negative_int, default=8192, metavar="N",
        help="training images for precise statistics; 0 skips them (default: 8192)",
    )  # fmt: skip
    common(p)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser(
        "recalibrate",
        help="recompute a checkpoint's batch-norm statistics precisely (the fix for stale statistics)",
        description="Recompute every BN layer's population statistics from training images with the weights "
        "frozen, print accuracy before and after, and write the result as a new checkpoint beside the original "
        "(RUN/checkpoint-precise.pt by default). bnlab evaluate and bnlab check accept it.",
    )
    p.add_argument("checkpoint", metavar="RUN_DIR_OR_CHECKPOINT", help="a run directory or a checkpoint file")
    p.add_argument("--samples", type=number_at_least_2, default=8192, help="training images to use (default: 8192)")
    p.add_argument("--batch-size", type=number_at_least_2, help="images per batch (default: the run's, 64)")
    p.add_argument("--one-at-a-time", type=non_negative_int, default=100, metavar="N", help="test images scored alone")
    p.add_argument("--out", metavar="FILE", help="where to write (default: CHECKPOINT-precise.pt beside it)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    common(p)
    p.set_defaults(func=cmd_recalibrate)

    p = sub.add_parser(
        "fold",
        help="fold a checkpoint's batch norm into the layers before it, for deployment",
        description="Fold every eval-mode BN layer into the convolution or linear layer before it (bnlab.fold) and "
        "write the folded checkpoint (CHECKPOINT-folded.pt by default; bnlab evaluate loads it) and a torch.export "
        "program beside it (.pt2). Prints the layers folded and left, the largest output difference on test "
        "images, test accuracy before and after, and eval latency at batch 1 and 256 before and after.",
    )
    p.add_argument("checkpoint", metavar="RUN_DIR_OR_CHECKPOINT", help="a run directory or a checkpoint file")
    p.add_argument("--out", metavar="FILE", help="where to write (default: CHECKPOINT-folded.pt beside it)")
    p.add_argument("--overwrite", action="store_true", help="replace --out (and its .pt2) if they exist")
    p.add_argument("--samples", type=number(int, 8, 10_000), default=1000, help="test images for the output difference")
    p.add_argument("--repeats", type=number(int, 1, 10_000), default=50, help="timed repeats per latency (default: 50)")
    common(p)
    p.set_defaults(func=cmd_fold)

    p = sub.add_parser(
        "summary",
        help="print the seed ConvNet's layers, shapes and parameter counts",
        description="Print a summary of the seed ConvNet.",
    )
    p.add_argument("--bn", choices=BN_MODES, default="manual", help="none, torch or manual (default: manual)")
    p.add_argument("--depth", type=number(int, 1, 200), default=19, help="conv layers, 1..200 (default: 19)")
    p.add_argument("--activation", choices=ACTIVATIONS, default="relu", help="activation function (default: relu)")
    common(p, data=False)
    p.set_defaults(func=cmd_summary)
