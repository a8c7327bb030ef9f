"""Worker processes (bnlab.training.pool): every item done once, and every stop accounted for, no process left."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bnlab.errors import BnlabError, UsageError
from bnlab.lab.benefits import runs
from bnlab.lab.benefits.networks import PAPER_MLP
from bnlab.training import store
from bnlab.training.pool import run_in_workers
from bnlab.training.runs import obtain_many


def record(item: tuple[str, str], folder: str) -> None:
    """A worker's item: write a file, or misbehave as the item says."""
    name, how = item
    if how == "fail":
        raise ValueError(f"item {name} is broken\non two lines")
    if how == "die":
        os.kill(os.getpid(), signal.SIGKILL)
    if how == "usage":
        raise UsageError(f"item {name} asks for the impossible")
    if how == "wait":
        Path(folder, f"{name}.started").write_text(str(os.getpid()))
        time.sleep(60)  # until interrupted
    Path(folder, name).write_text(str(os.getpid()))


def children() -> set[int]:
    """The live child processes of this one (but multiprocessing's resource tracker, which lives as long)."""
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                command = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if int(fields[1]) == os.getpid() and fields[0] != "Z" and b"resource_tracker" not in command:
                found.add(int(entry.name))
    return found


def group_alive(group: int) -> bool:
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return False
    return True


def test_every_item_is_done_once_by_the_workers(tmp_path):
    items = [(f"item{i}", "write") for i in range(6)]
    done = []
    before = children()
    run_in_workers(f"{__name__}.record", items, workers=2, shared=(str(tmp_path),), done=done.append)
    assert sorted(done) == list(range(6))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(name for name, _ in items)
    assert children() <= before


@pytest.mark.parametrize(
    ("how", "error", "fragment"),
    [("fail", BnlabError, "item bad is broken on two lines"), ("die", BnlabError, "SIGKILL"),
     ("usage", UsageError, "item bad asks for the impossible")],
)  # fmt: skip
def test_a_failing_or_dying_worker_stops_the_others_in_one_line(tmp_path, how, error, fragment):
    before, lost = children(), []
    with pytest.raises(error, match=fragment) as raised:
        run_in_workers(
            f"{__name__}.record", [("bad", how), ("slow", "wait")], workers=2, shared=(str(tmp_path),),
            lost=lambda index, why: lost.append((index, why)),
        )  # fmt: skip
    assert "\n" not in str(raised.value)
    assert children() <= before
    assert lost == ([(0, "its worker process died (killed by signal SIGKILL)")] if how == "die" else [])


def test_work_that_cannot_be_handed_to_workers_fails_at_once(tmp_path):
    with pytest.raises(BnlabError, match=r"cannot hand the work to worker processes .*--workers 1"):
        run_in_workers(f"{__name__}.record", [("a", "write")], workers=2, shared=(lambda: None,))


def test_workers_stop_when_their_parent_is_killed(tmp_path):
    script = (
        "import sys; sys.path.insert(0, sys.argv[2]); from bnlab.training.pool import run_in_workers\n"
        "if __name__ == '__main__':\n"
        "    run_in_workers('test_pool.record', [('a', 'wait'), ('b', 'wait')], workers=2, shared=(sys.argv[1],))\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", script, str(tmp_path), str(Path(__file__).parent)])
    try:
        deadline = time.monotonic() + 120
        while len(list(tmp_path.glob("*.started"))) < 2:
            assert parent.poll() is None and time.monotonic() < deadline
            time.sleep(0.1)
        pids = [int(p.read_text()) for p in tmp_path.glob("*.started")]
        parent.kill()
        parent.wait()
        deadline = time.monotonic() + 30  # each worker's watchdog looks every second
        while any(alive(pid) for pid in pids):
            assert time.monotonic() < deadline, "a worker outlived its killed parent"
            time.sleep(0.2)
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_an_interrupted_lab_in_workers_ends_in_one_line_and_records_its_runs(tmp_path):
    out = tmp_path / "lab"
    process = subprocess.Popen(
        [sys.executable, "-m", "bnlab.cli", "benefits", "--budget", "quick", "--claims", "2", "--workers", "2",
         "--out", str(out)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 240
        while not list((out / "runs").glob("*/metrics.jsonl")):  # the workers are training
            assert process.poll() is None and time.monotonic() < deadline, process.stderr.read()
            time.sleep(0.2)
        os.killpg(process.pid, signal.SIGINT)  # as Ctrl-C does: every process of the group
        _, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("bnlab benefits: claims")]
    assert process.returncode == 130 and len(lines) == 1 and "interrupted" in lines[0], err
    assert "Traceback" not in err
    statuses = [json.loads(p.read_text())["status"] for p in (out / "runs").glob("*/summary.json")]
    assert statuses and "running" not in statuses and "interrupted" in statuses
    deadline = time.monotonic() + 10  # multiprocessing's resource tracker leaves when it sees its parent gone
    while group_alive(process.pid):
        assert time.monotonic() < deadline, "a process of the job outlived it"
        time.sleep(0.1)


def test_runs_in_workers_are_the_runs_trained_here(small_mnist, tmp_path):
    configs = [
        PAPER_MLP.replace(hidden=(16,), batch_size=16, batches=6, eval_every=3, eval_size=64, lr=lr, seed=seed)
        for lr in (0.05, 0.1) for seed in (0, 1)
    ]  # fmt: skip
    configs.append(configs[0].replace(dropout=0.5))  # not stackable: trained alone
    here = obtain_many(configs, tmp_path / "here", data=small_mnist, **runs.QUIET)
    there = obtain_many(configs, tmp_path / "there", data=small_mnist, workers=2, **runs.QUIET)
    for config in configs:
        (a, how_a), (b, how_b) = here[config], there[config]
        assert (how_a, how_b) == ("trained", "trained") and a.status == b.status == "completed"
        assert [(h["batch"], h["split"]) for h in a.history] == [(h["batch"], h["split"]) for h in b.history]
        for x, y in zip(a.history, b.history, strict=True):  # one thread there, two here: rounding only
            assert abs(x["loss"] - y["loss"]) <= 1e-4 * max(1.0, abs(x["loss"])), (x, y)
    again = obtain_many(configs, tmp_path / "there", data=small_mnist, workers=2, **runs.QUIET)
    assert {how for _, how in again.values()} == {"reused"}
    assert store.read_summary(again[configs[0]][0].run_dir)["status"] == "completed"
