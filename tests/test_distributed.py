"""Data-parallel training: N processes with synchronized BN behave like one process with the whole batch.

Workers are real processes on localhost (gloo), started by the test and always reaped (mp.spawn joins
them; the command-line test waits on its launcher with a timeout and kills what is left). The other
ways a `--nproc` job can end (Ctrl-C, SIGTERM, usage errors): test_hostile_distributed.py.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from bnlab.config import TrainConfig
from bnlab.models import build_network
from bnlab.training import Hook, LoopState, fit, load_model, make_optimizer, store
from bnlab.training.distributed import World, synchronize

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")

# SGD: parameters move linearly with the gradients, so float32 noise stays float32 noise (Adam's first
# step divides a gradient by its own size, which turns a 1e-9 difference in a near-zero gradient into lr).
CONFIG = TrainConfig(bn="manual", depth=4, hidden=(16,), batch_size=64, optimizer="sgd", lr=0.1, momentum=0.9, seed=3)
STEPS = 3
# float64: the same sums in another order differ by ~1e-16, far from any ReLU's kink. (In float32 a
# 1e-7 difference can flip a unit sitting at zero, after which the gradients differ by whole units.)
TOLERANCE = dict(rtol=1e-9, atol=1e-11)


def _global_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    images = torch.rand(STEPS, 64, 1, 28, 28, generator=g, dtype=torch.float64)
    return [(x, torch.randint(0, 10, (64,), generator=g)) for x in images]


class Trace(Hook):
    """Loss, gradients, parameters and BN buffers after every step."""

    def __init__(self) -> None:
        self.steps: list[dict[str, torch.Tensor]] = []

    def after_step(self, state: LoopState) -> None:
        module = state.module
        record = {"loss": torch.tensor(state.loss)}
        record |= {f"grad.{k}": p.grad.clone() for k, p in module.named_parameters()}
        record |= {f"param.{k}": p.detach().clone() for k, p in module.named_parameters()}
        record |= {f"buffer.{k}": b.clone() for k, b in module.named_buffers()}
        self.steps.append(record)


def _train(world: World | None, shard: slice | None, synchronized: bool = True) -> list[dict[str, torch.Tensor]]:
    model = build_network(CONFIG).double()
    if world is not None:
        model = synchronize(model, world, torch.device("cpu")) if synchronized else _plain_ddp(model)
    state = LoopState(model, make_optimizer(CONFIG.optimizer, model.parameters(), CONFIG.lr, CONFIG.momentum))
    batches = iter([(x[shard], y[shard]) if shard else (x, y) for x, y in _global_batches()])
    trace = Trace()
    fit(state, batches, steps=STEPS, loss=CONFIG.loss, hooks=[trace], world=world)
    return trace.steps


def _plain_ddp(model: torch.nn.Module) -> torch.nn.Module:
    return torch.nn.parallel.DistributedDataParallel(model, forward_sync_buffers=False)


def _worker(rank: int, size: int, store_file: str, out: str, cases: dict[str, list[int]]) -> None:
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store_file}", rank=rank, world_size=size)
    try:
        world = World(rank, size, dist.group.WORLD)
        results = {}
        for name, sizes in cases.items():
            start = sum(sizes[:rank])
            shard = slice(start, start + sizes[rank])
            results[name] = _train(world, shard, synchronized=name != "unsynchronized")
        torch.save(results, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def _run(tmp_path: Path, size: int, cases: dict[str, list[int]]) -> list[dict]:
    mp.spawn(_worker, args=(size, str(tmp_path / "store"), str(tmp_path / "out"), cases), nprocs=size, join=True)
    return [torch.load(tmp_path / f"out.{rank}", weights_only=True) for rank in range(size)]


@pytest.fixture(scope="module")
def single() -> list[dict[str, torch.Tensor]]:
    return _train(None, None)


def _assert_same(got: list[dict], expected: list[dict]) -> None:
    for step, (a, b) in enumerate(zip(got, expected, strict=True)):
        for key in b:
            torch.testing.assert_close(a[key], b[key], **TOLERANCE, msg=lambda m, k=key, s=step: f"step {s}, {k}: {m}")


def test_two_processes_match_one_step_by_step_even_uneven_and_empty_shards(tmp_path, single):
    cases = {"32+32": [32, 32], "40+24": [40, 24], "64+0": [64, 0], "unsynchronized": [32, 32]}
    per_rank = _run(tmp_path, 2, cases)
    for results in per_rank:
        for name in ("32+32", "40+24", "64+0"):
            _assert_same(results[name], single)  # loss, gradients, parameters and running statistics
    # Without synchronized BN each process normalizes with its half's statistics: measurably not one batch.
    unsynced = per_rank[0]["unsynchronized"][-1]
    gap = max((unsynced[k] - single[-1][k]).abs().max().item() for k in single[-1] if k.startswith("param."))
    assert gap > 100 * TOLERANCE["atol"], gap


def test_four_processes_match_one(tmp_path, single):
    for results in _run(tmp_path, 4, {"4x16": [16, 16, 16, 16]}):
        _assert_same(results["4x16"], single)


# --- The command: launching, killing, resuming -----------------------------------------------------


def _bnlab(*args: str) -> list[str]:
    return [sys.executable, "-m", "bnlab.cli", *args]


def _children(pid: int) -> list[int]:
    """Every descendant process of ``pid`` (from /proc)."""
    found, queue = [], [pid]
    while queue:
        parent = queue.pop()
        for task in Path(f"/proc/{parent}/task").glob("*"):
            children = (task / "children").read_text().split() if (task / "children").exists() else []
            found += [int(c) for c in children]
            queue += [int(c) for c in children]
    return found


def _workers(launcher: int) -> dict[int, int]:
    """The launcher's worker processes, by rank: descendants running the bnlab worker."""
    workers = {}
    for pid in _children(launcher):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            environment = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"bnlab.training.distributed import _worker" in cmdline:
            rank = next(int(v[5:]) for v in environment if v.startswith(b"RANK="))
            workers[rank] = pid
    return workers


@pytest.mark.slow
def test_a_killed_worker_stops_the_job_with_a_message_and_the_run_resumes(tmp_path):
    out = tmp_path / "run"
    args = [
        "train",
        "--nproc",
        "2",
        "--bn",
        "manual",
        "--batches",
        "200",
        "--checkpoint-every",
        "20",
        "--device",
        "cpu",
    ]
    launcher = subprocess.Popen(_bnlab(*args, "--out", str(out)), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 240
        while not (out / store.CHECKPOINT).exists() and time.monotonic() < deadline and launcher.poll() is None:
            time.sleep(0.2)
        assert (out / store.CHECKPOINT).exists(), launcher.communicate(timeout=60)
        workers = _workers(launcher.pid)
        assert sorted(workers) == [0, 1], workers
        killed = time.monotonic()
        os.kill(workers[1], signal.SIGKILL)
        _, err = launcher.communicate(timeout=60)
        stopped_after = time.monotonic() - killed
    finally:
        if launcher.poll() is None:
            launcher.kill()
        for pid in _children(launcher.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    assert launcher.returncode == 1, err
    assert "Traceback" not in err.decode()
    message, *others = err.decode().strip().splitlines()
    assert not others, err  # the survivor, whose collective broke, adds nothing (not gloo's error)
    assert message.startswith("bnlab train: worker rank 1 failed (killed by signal SIGKILL); the job stopped.")
    assert "--resume" in message, message
    assert stopped_after < 30, stopped_after
    summary = store.read_summary(out)  # rank 0 saw only a broken connection; the launcher says who failed
    assert summary["status"] == "failed", summary
    assert summary["message"] == "worker rank 1 failed (killed by signal SIGKILL); the job stopped", summary
    checkpoint = load_model(out)  # the checkpoint written before stays loadable
    assert checkpoint.payload["step"] % 20 == 0 and checkpoint.payload["step"] < 200
    resumed = subprocess.run(
        _bnlab("train", "--nproc", "2", "--resume", "--out", str(out), "--device", "cpu"),
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr
    assert store.read_summary(out)["status"] == "completed" and store.read_summary(out)["batches_done"] == 200
