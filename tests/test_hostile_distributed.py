"""`bnlab train --nproc N` treated as a hostile user would: it must end as the command run alone ends.

Usage errors are found before any worker starts (same status, same line as one process); launcher
variables left in the environment are checked, never silently obeyed or ignored; Ctrl-C and SIGTERM
give exit 130 and one line, with rank 0's summary.json saying "interrupted" and no process left behind.
(SIGKILL of a worker, and resuming after it: test_distributed.py.) Every process a test starts is
reaped: the launcher's process group is killed in a finally, and its workers by their recorded pids.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch.distributed as dist

from bnlab.cli import main
from bnlab.cli.run import _without_nproc
from bnlab.config import TrainConfig
from bnlab.errors import Interrupted
from bnlab.training import distributed, store
from bnlab.training.distributed import LAUNCHER_VARIABLES, PEER_FAILED, WorkerFailed

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
INTERRUPTED_LINE = "bnlab train: interrupted; files already written are intact"


@pytest.fixture(autouse=True)
def _no_launcher_variables(monkeypatch):
    """The tests set the variables they mean; none inherited from the shell that runs pytest."""
    for name in LAUNCHER_VARIABLES:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def no_workers(monkeypatch):
    """Fails the test if the command gets as far as starting workers."""

    def launch(*args, **kwargs):
        raise AssertionError("workers were started")

    monkeypatch.setattr(distributed, "launch", launch)


def _one_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# --- The environment: launcher variables, cores -------------------------------------------------


@pytest.mark.parametrize(
    "environment",
    [{"WORLD_SIZE": "1"}, {"WORLD_SIZE": "2", "RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"},
     {"MASTER_ADDR": "localhost"}, {"WORLD_SIZE": "1", "LOCAL_RANK": "0"}],
)  # fmt: skip
def test_nproc_with_launcher_variables_in_the_environment_is_refused(environment, monkeypatch, capsys, no_workers):
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    assert main(["train", "--nproc", "2", "--oversubscribe"]) == 2
    line = _one_line(capsys)
    assert "--nproc 2 starts its own workers" in line
    assert all(f"{name}={value}" in line for name, value in environment.items()), line
    assert f"unset {' '.join(environment)}" in line and "or drop --nproc" in line


@pytest.mark.parametrize(
    ("environment", "expected"),
    [
        ({"WORLD_SIZE": "abc"}, "WORLD_SIZE='abc' in the environment: expected the number of processes"),
        ({"WORLD_SIZE": "0"}, "WORLD_SIZE='0'"),
        ({"WORLD_SIZE": "+2"}, "WORLD_SIZE='+2'"),
        ({"WORLD_SIZE": "2"}, "WORLD_SIZE=2 is set in the environment but RANK, MASTER_ADDR, MASTER_PORT are not"),
        ({"WORLD_SIZE": "2", "RANK": "0", "MASTER_ADDR": "h"}, "but MASTER_PORT is not"),
        ({"WORLD_SIZE": "2", "RANK": "2", "MASTER_ADDR": "h", "MASTER_PORT": "1"}, "RANK='2'"),
        ({"WORLD_SIZE": "2", "RANK": "-1", "MASTER_ADDR": "h", "MASTER_PORT": "1"}, "RANK='-1'"),
        ({"WORLD_SIZE": "2", "RANK": "1", "MASTER_ADDR": "h", "MASTER_PORT": "70000"}, "MASTER_PORT='70000'"),
        ({"WORLD_SIZE": "2", "RANK": "1", "MASTER_ADDR": "a b", "MASTER_PORT": "1"}, "MASTER_ADDR='a b'"),
        ({"WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "3"}, "LOCAL_WORLD_SIZE='3'"),
        ({"WORLD_SIZE": "1", "LOCAL_RANK": "1"}, "LOCAL_RANK='1'"),
        ({"RANK": "0"}, "RANK is set in the environment but WORLD_SIZE is not"),
    ],
)
def test_malformed_launcher_variables_are_one_line_usage_errors(environment, expected, monkeypatch, capsys):
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    assert main(["train", "--batches", "1"]) == 2
    line = _one_line(capsys)
    assert expected in line and "unset them to train in one process" in line, line


def test_the_environment_of_a_torchrun_worker_is_a_worker_and_nothing_starts_workers(monkeypatch):
    assert distributed.workers_to_start(None) == 0  # alone
    assert distributed.workers_to_start(1) == 0
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert distributed.workers_to_start(None) == 0  # torchrun --nproc-per-node 1: alone as well
    worker = {"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "h0"}
    for name, value in (worker | {"MASTER_PORT": "29500"}).items():
        monkeypatch.setenv(name, value)
    assert distributed.workers_to_start(None) == 0
    assert distributed.variables()["RANK"] == "3"


def test_nproc_above_the_usable_cores_is_refused_unless_oversubscribe(tmp_path, capsys, no_workers):
    cores = distributed.usable_cores()
    if cores >= 256:
        pytest.skip("--nproc stops at 256")
    assert main(["train", "--nproc", str(cores + 1)]) == 2
    line = _one_line(capsys)
    assert f"--nproc {cores + 1} is more than the {cores} CPU cores" in line and "--oversubscribe" in line
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "mine.txt").write_text("x")
    # accepted with the override: the command goes on to its next check
    assert main(["train", "--nproc", str(cores + 1), "--oversubscribe", "--out", str(busy)]) == 2
    assert "holds files that are not a bnlab run's" in _one_line(capsys)
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert "--oversubscribe allow --nproc above the usable CPU cores" in " ".join(capsys.readouterr().out.split())


# --- Usage errors: found before any worker starts, as one process finds them -----------------------


def _run(path: Path, status: str, checkpoint: bool) -> Path:
    """A run directory as a run that ended with ``status`` leaves it (with a resumable checkpoint if asked)."""
    run = store.RunDir.create(path)
    config = TrainConfig(batches=10)
    run.write_config(config)
    run.write_summary({"status": status, "message": "", "batches_done": 5})
    if checkpoint:  # not a loadable network: enough for the checks made before training
        run.save_checkpoint(store.CHECKPOINT, {"config": config.to_dict(), "state_dict": {}, "step": 5})
    run.close()
    return path


def _listing(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir()) if p.name != store.LOCK}


@pytest.mark.parametrize(
    ("case", "status", "expected"),
    [
        ("not empty", 2, "holds files that are not a bnlab run's (notes.txt); choose another folder"),
        ("completed", 2, "holds a run that already completed; there is nothing to resume"),
        ("no checkpoint", 1, "no checkpoint at"),
        ("not resumable", 1, "has no training state to resume from"),
        ("no run", 2, "holds no bnlab run to resume (no config.json); start a new run instead"),
    ],
)
def test_usage_errors_come_before_any_worker_starts_with_the_one_process_message(
    case, status, expected, tmp_path, capsys, no_workers
):
    out = tmp_path / "run"
    resume = ["--resume"] if case != "not empty" else []
    if case in ("not empty", "no run"):
        out.mkdir()
        (out / "notes.txt").write_text("mine")
    else:
        _run(out, "completed" if case == "completed" else "interrupted", checkpoint=case == "not resumable")
    before = _listing(out)
    assert main(["train", "--nproc", "2", "--oversubscribe", *resume, "--out", str(out)]) == status
    with_workers = _one_line(capsys)
    assert _listing(out) == before  # no worker wrote anything, and nor did the launcher
    assert main(["train", *resume, "--out", str(out)]) == status
    alone = _one_line(capsys)
    assert with_workers == alone and expected in alone, (with_workers, alone)


def test_the_workers_command_line_has_none_of_the_launchers_options_however_spelt():
    argv = ["--nproc", "2", "--batches", "5", "--npr=3", "--oversub", "--ou", "d", "--out=e", "--no-fast", "--seed=1"]
    assert _without_nproc(argv) == ["--batches", "5", "--no-fast", "--seed=1"]


# --- Which worker failed: the launcher's verdict --------------------------------------------------


class _Process:
    pid = 0


def _worker(rank: int, status: int | None, seen: int, said: str = "") -> distributed._Worker:
    output = None
    if rank:
        output = io.BytesIO()
        output.write(f"some warning\n{said}\n".encode())
    return distributed._Worker(rank, _Process(), output, status, seen)  # type: ignore[arg-type]


def _outcome(*workers: distributed._Worker) -> int:
    job = distributed._Job()
    job.workers = list(workers)
    return job.outcome()


def test_the_launcher_names_the_worker_that_failed_first_not_the_peers_that_lost_it():
    with pytest.raises(WorkerFailed, match=r"^worker rank 2 failed \(killed by signal SIGKILL\)$"):
        _outcome(_worker(0, PEER_FAILED, 3), _worker(1, PEER_FAILED, 3), _worker(2, -9, 1))
    with pytest.raises(WorkerFailed, match=r"worker rank 1 failed \(killed by signal SIGSEGV\)"):  # seen together
        _outcome(_worker(0, 1, 2), _worker(1, -11, 2))
    with pytest.raises(WorkerFailed, match=r"^worker rank 1 failed \(exit code 1: bnlab train: out of memory"):
        _outcome(_worker(0, PEER_FAILED, 2), _worker(1, 1, 1, said="bnlab train: out of memory; use smaller sizes"))
    with pytest.raises(WorkerFailed, match="lost their connections"):
        _outcome(_worker(0, PEER_FAILED, 1), _worker(1, PEER_FAILED, 1))
    with pytest.raises(Interrupted):  # a worker interrupted from outside the job: the job is interrupted
        _outcome(_worker(0, PEER_FAILED, 2), _worker(1, 130, 1))
    assert _outcome(_worker(0, 2, 1), _worker(1, 2, 1, said="bnlab train: error: ...")) == 2  # rank 0 has said it
    assert _outcome(_worker(0, 0, 1), _worker(1, 0, 1)) == 0


def test_a_gloo_connection_lost_to_a_peer_is_a_peer_failure_and_other_errors_are_not():
    closed = (
        "[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:14245. "
        "This is typically caused by a remote worker crashing."
    )
    assert distributed.peer_failure(RuntimeError(closed)) == "Connection closed by peer [127.0.0.1]:14245"
    assert distributed.peer_failure(dist.DistNetworkError("Connection reset by peer")) == "Connection reset by peer"
    assert distributed.peer_failure(RuntimeError("mat1 and mat2 shapes cannot be multiplied")) is None
    assert distributed.peer_failure(ValueError(closed)) is None


# --- Signals: a real job on localhost -------------------------------------------------------------


def _descendants(pid: int) -> list[int]:
    found, queue = [], [pid]
    while queue:
        parent = queue.pop()
        for task in Path(f"/proc/{parent}/task").glob("*"):
            with contextlib.suppress(OSError):
                children = [int(c) for c in (task / "children").read_text().split()]
                found += children
                queue += children
    return found


def _workers(launcher: int) -> list[int]:
    workers = []
    for pid in _descendants(launcher):
        with contextlib.suppress(OSError):
            if b"bnlab.training.distributed import _worker" in Path(f"/proc/{pid}/cmdline").read_bytes():
                workers.append(pid)
    return workers


def _state(pid: int) -> str:
    """The process's state letter (R running, S sleeping, T stopped, Z zombie...); "" once it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return ""


def _alive(pid: int) -> bool:
    return _state(pid) not in ("", "Z")


def _until(condition: Callable[[], bool], seconds: float = 60) -> bool:
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.05)
    return condition()


@contextlib.contextmanager
def _job(out: Path, until: Callable[[subprocess.Popen], bool]) -> Iterator[tuple[subprocess.Popen, set[int]]]:
    """``bnlab train --nproc 2`` into ``out``: (the launcher, the pids of all it started) once ``until(launcher)``."""
    args = ["train", "--nproc", "2", "--oversubscribe", "--batches", "100000", "--precise-samples", "0"]
    launcher = subprocess.Popen(
        [sys.executable, "-m", "bnlab.cli", *args, "--device", "cpu", "--out", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, process_group=0,  # a job of a shell
    )  # fmt: skip
    seen: set[int] = set()
    try:
        deadline = time.monotonic() + 240
        while launcher.poll() is None and not until(launcher) and time.monotonic() < deadline:
            seen.update(_descendants(launcher.pid))
            time.sleep(0.05)
        seen.update(_descendants(launcher.pid))
        if launcher.poll() is not None or not until(launcher):
            launcher.kill()
            raise AssertionError(f"the job did not get that far: {launcher.communicate(timeout=60)}")
        yield launcher, seen
    finally:  # the test's own cleanup, after its assertions: whatever is left is killed and reaped
        for pid in [launcher.pid, *seen]:
            if _alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pid, signal.SIGKILL)
        launcher.wait(timeout=60)


def _training(out: Path):
    def started(launcher) -> bool:
        metrics = out / store.METRICS
        return metrics.exists() and '"event": "step"' in metrics.read_text() and len(_workers(launcher.pid)) == 2

    return started


def _assert_interrupted(launcher: subprocess.Popen, seen: set[int], signum: int) -> None:
    workers = _workers(launcher.pid)
    assert len(workers) == 2, workers
    os.kill(launcher.pid, signum)
    _, stderr = launcher.communicate(timeout=60)
    err = stderr.decode()
    assert launcher.returncode == 130, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines == [INTERRUPTED_LINE], err  # nothing from the workers: no traceback, no warning
    assert not [pid for pid in seen if _alive(pid)]  # every worker, and anything they started, is gone


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_interrupting_the_launcher_mid_training_exits_130_with_one_line_and_rank_0_records_it(tmp_path, signum):
    out = tmp_path / "run"
    with _job(out, _training(out)) as (launcher, seen):
        workers = _workers(launcher.pid)
        os.kill(launcher.pid, signal.SIGTSTP)  # Ctrl-Z first: the job pauses as one process would, and goes on
        assert _until(lambda: [_state(pid) for pid in [launcher.pid, *workers]] == ["T"] * 3)
        os.kill(launcher.pid, signal.SIGCONT)
        assert _until(lambda: "T" not in [_state(pid) for pid in [launcher.pid, *workers]])
        _assert_interrupted(launcher, seen, signum)
    summary = store.read_summary(out)
    assert summary["status"] == "interrupted", summary
    assert summary["message"].startswith("interrupted after ") and summary["batches_done"] >= 1, summary


@pytest.mark.slow
def test_interrupting_the_launcher_while_the_workers_start_leaves_nothing_running(tmp_path):
    out = tmp_path / "run"
    with _job(out, lambda launcher: len(_workers(launcher.pid)) == 2) as (launcher, seen):
        _assert_interrupted(launcher, seen, signal.SIGINT)
    assert not (out / store.SUMMARY).exists() or store.read_summary(out)["status"] == "interrupted"


@pytest.mark.slow
def test_workers_started_by_torchrun_still_train(tmp_path):
    out = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "bnlab.cli",
         "train", "--batches", "3", "--precise-samples", "0", "--device", "cpu", "--json", "--out", str(out)],
        capture_output=True, text=True, timeout=600, env=os.environ | {"GLOO_SOCKET_IFNAME": "lo"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert json.load(io.StringIO(result.stdout))["status"] == "completed"  # rank 0 alone prints its summary
    assert store.read_summary(out)["batches_done"] == 3
    assert json.loads((out / store.CONFIG).read_text())["world_size"] == 2
