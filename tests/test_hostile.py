"""The hostile audit's cases, each a test: every stop of a run accounted for, results that say where they come
from, one writer per file, and refusals that name the problem instead of a traceback or a silent wrong number.

(The distributed job's cases are in test_hostile_distributed.py, the kernels' in test_differential.py and
test_kernels.py, recalibrate's data forms in test_precise.py.)
"""

from __future__ import annotations

import errno
import json
import os
import re
import resource
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch
from torch import nn

from bnlab.cli import main
from bnlab.config import TrainConfig
from bnlab.errors import UsageError
from bnlab.training import load_model, store, train
from test_cli_errors import finish

# A few batches with a resumable checkpoint every 2: big enough to write checkpoints, small enough to be quick.
SMALL_RUN = ["train", "--batches", "6", "--checkpoint-every", "2", "--precise-samples", "0"]


def bnlab_process(*args: str, **options) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "bnlab.cli", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **options
    )


def one_line(err: str) -> str:
    assert "Traceback" not in err and "internal error" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    return lines[0]


# --- OS errors while a run writes: one line naming the file, summary.json "failed" ------------------------


@pytest.fixture
def tiny_disk(tmp_path):
    """A 600 KiB tmpfs (root only): room for a run's first files, not for its checkpoint."""
    mount = tmp_path / "tiny"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=600k", "tmpfs", str(mount)]).returncode:
        pytest.skip("mounting a small tmpfs needs root; the file-size limit and fault-injection cases still run")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def _assert_failed_naming(out: Path, err: str, returncode: int, reason: str) -> None:
    line = one_line(err)
    assert returncode == 1 and reason in line and str(out / store.CHECKPOINT) in line, err
    summary = store.read_summary(out)
    assert summary["status"] == "failed" and str(out / store.CHECKPOINT) in summary["message"], summary
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]  # no half-written file holds the space


def test_a_full_disk_fails_the_run_naming_the_file(tiny_disk):
    out = tiny_disk / "run"
    process = bnlab_process(*SMALL_RUN, "--out", str(out))
    _, err = finish(process, timeout=300)
    _assert_failed_naming(out, err, process.returncode, "No space left on device")


def test_a_file_size_limit_fails_the_run_naming_the_file(tmp_path):
    """EFBIG, as under a quota: was "internal error: RuntimeError: [enforce fail at inline_container.cc...]"."""
    out = tmp_path / "run"
    limit = 200 * 1024  # room for config, metrics and summary; not for a 560 KB checkpoint

    def limit_file_size() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    process = bnlab_process(*SMALL_RUN, "--out", str(out), preexec_fn=limit_file_size)
    _, err = finish(process, timeout=300)
    _assert_failed_naming(out, err, process.returncode, "File too large")


@pytest.mark.parametrize("code", [errno.EROFS, errno.EDQUOT, errno.ENOSPC], ids=["EROFS", "EDQUOT", "ENOSPC"])
def test_a_write_that_fails_at_its_rename_is_reported_and_recorded(tmp_path, capsys, monkeypatch, code):
    """Fault injection where no real file system can be made to fail: the checkpoint's rename into place."""
    out = tmp_path / "run"
    real_replace = os.replace

    def replace(src, dst, *args, **kwargs):
        if Path(dst).name == store.CHECKPOINT:
            raise OSError(code, os.strerror(code))
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", replace)
    assert main([*SMALL_RUN, "--out", str(out)]) == 1
    _assert_failed_naming(out, capsys.readouterr().err, 1, os.strerror(code))


def test_summary_json_is_rewritten_in_place_when_not_even_its_copy_fits(tmp_path, monkeypatch):
    run = store.RunDir.create(tmp_path / "run")
    try:
        run.write_summary({"status": "running"})
        monkeypatch.setattr(
            "bnlab.fileio.tempfile.mkstemp", lambda *a, **k: (_ for _ in ()).throw(OSError(errno.ENOSPC, "full"))
        )
        run.write_summary({"status": "failed", "message": "the disk is full"})
    finally:
        run.close()
    assert store.read_summary(tmp_path / "run") == {"status": "failed", "message": "the disk is full"}


# --- Results from an unfinished run say so ----------------------------------------------------------------


@pytest.fixture(scope="module")
def interrupted_run(tmp_path_factory) -> Path:
    """A run planned for 3,000 batches, interrupted (SIGINT) after its first periodic checkpoint."""
    out = tmp_path_factory.mktemp("runs") / "interrupted"
    process = bnlab_process("train", "--batches", "3000", "--checkpoint-every", "5", "--out", str(out))
    try:
        deadline = time.monotonic() + 180
        while not (out / store.CHECKPOINT).exists():
            assert process.poll() is None and time.monotonic() < deadline, "the run ended before its first checkpoint"
            time.sleep(0.05)
        process.send_signal(signal.SIGINT)
        _, err = finish(process, timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 130, err
    return out


def test_evaluate_of_an_unfinished_run_says_from_which_step(interrupted_run, capsys):
    assert main(["evaluate", str(interrupted_run), "--precise-samples", "0", "--samples", "5", "--json"]) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out)
    step = load_model(interrupted_run).step
    assert step % 5 == 0 and 0 < step < 3000
    assert (result["step"], result["planned_batches"], result["finished"]) == (step, 3000, False)
    assert result["run_status"] == "interrupted"
    assert f"after {step} of 3000 planned training steps; NOT a finished run (its run is interrupted)" in captured.err


def test_recalibrate_of_an_unfinished_run_says_so_and_keeps_saying_so(interrupted_run, capsys):
    out = interrupted_run / "precise.pt"
    assert main(["recalibrate", str(interrupted_run), "--samples", "64", "--out", str(out), "--json"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["finished"] is False and "NOT a finished run" in captured.out + captured.err
    assert not load_model(out).finished  # the recalibrated copy is still the weights of an unfinished run


def test_a_finished_run_is_described_as_finished(tmp_path):
    out = tmp_path / "run"
    train(TrainConfig(bn="manual", batches=2, precise_samples=0, one_at_a_time=0), run_dir=out, device="cpu", log=print)
    checkpoint = load_model(out)
    assert checkpoint.finished and checkpoint.describe() == "bn=manual, seed 0, after 2 of 2 planned training steps"


# --- One writer per file ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "finished"
    train(TrainConfig(bn="manual", batches=2, precise_samples=0, one_at_a_time=0), run_dir=out, device="cpu",
          log=lambda _: None)  # fmt: skip
    return out


def test_recalibrate_while_another_writes_the_run_is_refused(finished_run, capsys):
    """Two recalibrations of one run both succeeded, one silently replacing the other's checkpoint-precise.pt."""
    with store.exclusive(finished_run):  # the other writer, holding the run's lock
        assert main(["recalibrate", str(finished_run), "--samples", "64"]) == 2
    assert "another bnlab process is writing" in one_line(capsys.readouterr().err)
    assert not (finished_run / "checkpoint-precise.pt").exists()
    assert main(["recalibrate", str(finished_run), "--samples", "64"]) == 0  # once it is done, the next one runs
    assert main(["recalibrate", str(finished_run), "--samples", "64"]) == 2  # and never overwrites silently
    assert "--overwrite" in one_line(capsys.readouterr().err)


def test_a_file_written_outside_a_run_is_locked_and_leaves_no_trace(tmp_path, monkeypatch):
    """recalibrate --out into a user's folder: a second writer is refused, and the folder keeps no lock file."""
    target = tmp_path / "model-precise.pt"
    with store.writing(target), pytest.raises(UsageError, match="another bnlab process"), store.writing(target):
        pass
    assert list(tmp_path.iterdir()) == []
    real_flock = store.fcntl.flock

    def holder_finished_between_open_and_flock(fd: int, operation: int) -> None:
        lock = tmp_path / ".model-precise.pt.lock"
        lock.unlink()  # the holder removed the file we opened; a third writer made a new one and holds it
        lock.touch()
        real_flock(fd, operation)

    monkeypatch.setattr(store.fcntl, "flock", holder_finished_between_open_and_flock)
    with pytest.raises(UsageError, match="another bnlab process is writing"), store.writing(target):
        pass


# --- Refusals that name the problem -----------------------------------------------------------------------


def meta_model() -> nn.Module:
    with torch.device("meta"):
        return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(10))


def test_check_of_a_model_on_the_meta_device_is_one_line(tmp_path, capsys, monkeypatch):
    module = f"meta_factory_{uuid.uuid4().hex}"
    (tmp_path / f"{module}.py").write_text(f"from {__name__} import meta_model as build\n")
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    monkeypatch.syspath_prepend(str(tmp_path))
    assert main(["check", f"{module}:build"]) == 2
    assert "meta device" in one_line(capsys.readouterr().err)


def test_replacing_a_run_never_deletes_a_users_files(tmp_path):
    """--fresh replaces a run's directory; it once also deleted anything named .* or checkpoint-*."""
    out = tmp_path / "run"
    config = TrainConfig(bn="manual", batches=2, precise_samples=0, one_at_a_time=0)
    train(config, run_dir=out, device="cpu", log=lambda _: None)
    for name in (".my-notes", "checkpoint-precise.pt"):
        (out / name).write_text("mine")
        with pytest.raises(UsageError, match=f"holds files that are not a bnlab run's \\({re.escape(name)}\\)"):
            train(config, run_dir=out, device="cpu", log=lambda _: None, replace=True)
        assert (out / name).read_text() == "mine"
        (out / name).unlink()
    (out / ".summary.json.abc123.tmp").write_text("{")  # what a run killed mid-write leaves: a run's own
    (out / "checkpoint-10.pt").write_text("")  # a snapshot
    train(config, run_dir=out, device="cpu", log=lambda _: None, replace=True)
    assert not (out / "checkpoint-10.pt").exists() and store.read_summary(out)["status"] == "completed"
