"""The run store: what a training run leaves on disk, written so that nothing is lost and nobody collides.

A run directory holds::

    config.json      {"format", "version", "config": TrainConfig, "bnlab", "torch", "device", ...},
                     written before the first step
    metrics.jsonl    one JSON object per line, appended and flushed as the run goes; "step" is the
                     number of training steps done when the record was written, "batch" its label:
                     {"event": "step", "step": 18, "batch": 17, "loss": ..}     every batch's training loss
                     {"event": "eval", "step": 101, "batch": 100, "split": "validation", "loss": ..,
                      "accuracy": .., "seconds": ..}                              an evaluation
    summary.json     {"status": running | completed | diverged | interrupted | failed, "message", figures};
                     rewritten whole, so always a complete document
    checkpoint.pt    the latest state: model, and (for resuming) optimizer, batch order, RNG and the step
    checkpoint-N.pt  snapshots of the model after batch N, when the config asks for them
    .lock            held (flock) by the one process writing the run

Guarantees:
- **One writer.** ``RunDir.create`` makes the directory with an atomic ``mkdir``, or takes an empty
  existing one, and holds an exclusive lock on ``.lock`` for the run's lifetime; a second writer is
  refused (``UsageError``, exit 2) instead of interleaving its metrics. The lock dies with its
  process, so a killed run never blocks the next.
- **Nothing torn.** JSON files and checkpoints are written beside their target and renamed over it;
  every line of metrics.jsonl but possibly the last is complete (``read_metrics`` skips a torn last
  line).
- **Versioned.** Files carry ``format`` and ``version``; another version is refused by name.
- **Resumable.** A run that stopped (interrupted, killed, failed) resumes from its latest checkpoint:
  ``RunDir.resume`` drops the metrics written after it, and the loop continues from that step.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import json
import math
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import torch
from torch import nn

from bnlab.config import TrainConfig
from bnlab.errors import CheckpointError, UsageError
from bnlab.fileio import OUT_OF_SPACE, atomic_write_bytes, json_bytes, naming, read_json, rewrite_in_place, write_json
from bnlab.version import __version__

FORMAT, CHECKPOINT_FORMAT, VERSION = "bnlab.run", "bnlab.checkpoint", 2
CONFIG, METRICS, SUMMARY, CHECKPOINT, LOCK = "config.json", "metrics.jsonl", "summary.json", "checkpoint.pt", ".lock"
FINISHED = ("completed", "diverged")  # a run that ended by itself: its result stands and can be reused


def snapshot_name(batch: int) -> str:
    return f"checkpoint-{batch}.pt"


def default_run_dir(root: str | Path, config: TrainConfig) -> Path:
    """``ROOT/BN-seedS-YYYYmmdd-HHMMSS-PID``: distinct for runs started in the same second."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path(root) / f"{config.bn}-seed{config.seed}-{stamp}-{os.getpid()}"


class RunDir:
    """One run directory, held exclusively by this process until ``close``."""

    def __init__(self, path: Path, lock: IO[str]) -> None:
        self.path = path
        self._lock = lock
        self._metrics: IO[str] | None = None

    @classmethod
    def create(cls, path: str | Path, *, replace: bool = False) -> RunDir:
        """A new run in ``path``, which must not exist or be empty; refused if another process writes it.

        ``replace``: a folder holding a bnlab run's files and nothing else (an unfinished run, or one of
        another config) is cleared first, under the lock, so a concurrent writer's files are never deleted.
        """
        path = Path(path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            try:
                path.mkdir()
            except FileExistsError:
                if not path.is_dir():
                    raise UsageError(f"{path} exists and is not a folder; choose another") from None
            run = cls(path, cls._take_lock(path))
        except OSError as err:
            raise UsageError(f"cannot create the run folder {path}: {err.strerror or err}") from None
        try:
            present = [p for p in path.iterdir() if p.name != LOCK]
            if present and replace and _only_run_files(present):
                for p in present:
                    p.unlink()
                present = []
            if present:
                foreign = [p for p in present if not _only_run_files([p])] or present
                names = ", ".join(sorted(p.name for p in foreign)[:3])
                raise UsageError(
                    f"{path} holds files that are not a bnlab run's ({names}); choose another folder, move them "
                    "away, or resume the run in it (bnlab train --resume)"
                )
        except BaseException:
            run.close()
            raise
        return run

    @classmethod
    def resume(cls, path: str | Path) -> tuple[RunDir, dict[str, Any]]:
        """The stopped run in ``path`` and its latest checkpoint; metrics after that checkpoint are dropped."""
        path = Path(path)
        require_run(path)
        run = cls(path, cls._take_lock(path))
        try:
            summary = read_summary(path)
            if summary.get("status") in FINISHED:
                raise UsageError(f"{path} holds a run that already {summary['status']}; there is nothing to resume")
            checkpoint = load_checkpoint(path / CHECKPOINT)
            if "resume" not in checkpoint:
                raise CheckpointError(f"{path / CHECKPOINT} has no training state to resume from")
            step = checkpoint["step"]
            kept = [r for r in read_metrics(path / METRICS) if r["step"] <= step]  # the rest is redone
            atomic_write_bytes(path / METRICS, "".join(json.dumps(r) + "\n" for r in kept).encode())
        except BaseException:
            run.close()
            raise
        return run, checkpoint

    @staticmethod
    def _take_lock(path: Path, name: str = LOCK) -> IO[str]:
        lock = open(path / name, "a")  # noqa: SIM115 (held open for the run's lifetime)
        try:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            # a lock file its holder removed (``writing``) between our open and our flock is not the lock
            if os.fstat(lock.fileno()).st_ino != (path / name).stat().st_ino:
                raise BlockingIOError
        except (BlockingIOError, FileNotFoundError):
            lock.close()
            raise UsageError(f"another bnlab process is writing {path}; wait for it or choose another folder") from None
        return lock

    def write_config(self, config: TrainConfig, **details: Any) -> None:
        header = {"format": FORMAT, "version": VERSION, "config": config.to_dict(), "bnlab": __version__}
        write_json(self.path / CONFIG, header | {"torch": torch.__version__} | details)

    def write_summary(self, summary: dict[str, Any]) -> None:
        """summary.json, atomically; on a full disk, where a temporary copy has no room, rewritten in place, so
        that the run's last status (failed, with the file that could not be written) still reaches the disk."""
        path, data = self.path / SUMMARY, json_bytes(finite_or_none(summary))
        try:
            atomic_write_bytes(path, data)
        except OSError as err:
            if err.errno not in OUT_OF_SPACE or not path.is_file():
                raise
            rewrite_in_place(path, data)

    def record(self, record: dict[str, Any]) -> None:
        """Append one record to metrics.jsonl and flush it."""
        path = self.path / METRICS
        try:
            if self._metrics is None:
                self._metrics = open(path, "a", encoding="utf-8")  # noqa: SIM115 (closed by close())
            self._metrics.write(json.dumps(finite_or_none(record), allow_nan=False) + "\n")
            self._metrics.flush()
        except OSError as err:
            raise naming(err, path) from err

    def save_checkpoint(self, name: str, payload: dict[str, Any]) -> None:
        save_checkpoint(self.path / name, payload)

    def close(self) -> None:
        try:
            if self._metrics is not None:
                with contextlib.suppress(OSError):  # a full disk fails the flush again; the error was raised once
                    self._metrics.close()
                self._metrics = None
        finally:
            self._lock.close()  # releases the flock


def require_run(path: Path) -> None:
    """Refuse (``UsageError``) a folder that holds no bnlab run to resume."""
    if not (Path(path) / CONFIG).is_file():
        raise UsageError(f"{path} holds no bnlab run to resume (no {CONFIG}); start a new run instead")


@contextlib.contextmanager
def exclusive(folder: Path) -> Iterator[None]:
    """Hold ``folder``'s writer lock (the run directory's, when it is one) inside the block: a second writer,
    whether a run or a command writing beside its checkpoint, is refused (``UsageError``) instead of racing."""
    lock = RunDir._take_lock(Path(folder))
    try:
        yield
    finally:
        lock.close()


@contextlib.contextmanager
def writing(path: Path) -> Iterator[None]:
    """Hold the writer lock for the file ``path`` inside the block: its run directory's, when it is written into
    one (a run and a command writing beside its checkpoint exclude each other), else a ``.NAME.lock`` beside it,
    removed afterwards, so a user's folder keeps no trace of it."""
    path = Path(path)
    if (path.parent / CONFIG).is_file():
        with exclusive(path.parent):
            yield
        return
    name = f".{path.name}.lock"
    lock = RunDir._take_lock(path.parent, name)
    try:
        yield
    finally:
        (path.parent / name).unlink(missing_ok=True)  # under the lock: one who opened it first finds it gone
        lock.close()


def record_end(run_dir: str | Path, status: str, message: str) -> None:
    """Say in ``run_dir``'s summary how its run ended, when its writer could not know: the launcher of a
    multi-process run knows which worker died, where rank 0 saw only a broken connection. A summary that
    already says the run completed, diverged or was interrupted is kept; so is a folder with no summary."""
    path = Path(run_dir)
    if not (path / SUMMARY).is_file():
        return
    with exclusive(path):
        summary = read_summary(path)
        if summary.get("status") not in (*FINISHED, "interrupted"):
            write_json(path / SUMMARY, summary | {"status": status, "message": message})


_RUN_FILE = re.compile(
    rf"({re.escape(CONFIG)}|{re.escape(METRICS)}|{re.escape(SUMMARY)}|{re.escape(CHECKPOINT)}|checkpoint-\d+\.pt)"
)
_TEMPORARY = re.compile(rf"\.({_RUN_FILE.pattern})\.[^/]+\.tmp")  # fileio's atomic writes, left by a killed run


def _only_run_files(present: list[Path]) -> bool:
    """Whether ``present`` are all files a run writes: its own by name, snapshots ``checkpoint-N.pt`` and the
    temporary files of its atomic writes. Anything else (a user's notes, a recalibrated checkpoint-precise.pt)
    keeps the folder from being replaced: a user's own files are never deleted."""
    return all(p.is_file() and (_RUN_FILE.fullmatch(p.name) or _TEMPORARY.fullmatch(p.name)) for p in present)


def finite_or_none(obj: Any) -> Any:
    """JSON has no NaN or infinity: they are written as null."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_or_none(v) for v in obj]
    return obj


def read_metrics(path: Path) -> Iterator[dict[str, Any]]:
    """The records of a metrics.jsonl; a torn last line (from a killed run) is skipped."""
    if not path.exists():
        return
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                yield json.loads(line)
            except json.JSONDecodeError:
                if line.endswith("\n"):  # only a torn final line is expected; anything else is damage
                    raise CheckpointError(f"{path}: corrupt line {line[:60]!r}") from None


def read_summary(run_dir: Path) -> dict[str, Any]:
    try:
        summary = read_json(run_dir / SUMMARY)
    except (OSError, ValueError) as err:
        raise CheckpointError(f"cannot read {run_dir / SUMMARY}: {err}") from None
    if not isinstance(summary, dict):
        raise CheckpointError(f"{run_dir / SUMMARY} is not a run summary")
    return summary


def read_config(run_dir: Path) -> TrainConfig:
    """The validated TrainConfig of the run in ``run_dir``."""
    try:
        header = read_json(run_dir / CONFIG)
    except (OSError, ValueError) as err:
        raise CheckpointError(f"cannot read {run_dir / CONFIG}: {err}") from None
    _check_format(run_dir / CONFIG, header, FORMAT)
    return _config(header, run_dir / CONFIG)


def _check_format(path: Path, payload: Any, expected: str) -> None:
    if not isinstance(payload, dict) or payload.get("format") != expected:
        raise CheckpointError(f"{path} is not a bnlab {expected.split('.')[-1]} file (no format marker {expected!r})")
    if payload.get("version") != VERSION:
        raise CheckpointError(
            f"{path} has {expected} version {payload.get('version')}; this bnlab ({__version__}) reads version "
            f"{VERSION}. Retrain the run with this version."
        )


def _config(payload: dict[str, Any], path: Path) -> TrainConfig:
    try:
        return TrainConfig.from_dict(payload.get("config"), where=f"{path}: config")
    except UsageError as err:
        raise CheckpointError(str(err)) from None


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    """``payload`` (config, state_dict, ...) with the format marker, written atomically; tensors moved to the CPU.

    Serialized in memory first, so a failing write is a plain ``OSError`` naming ``path`` (a full disk, a
    file-size limit), with no half-written temporary file left holding the space.
    """
    payload = {"format": CHECKPOINT_FORMAT, "version": VERSION, **payload}
    # copies: a stacked run's tensors are views of its whole stack, which torch.save would write out entire
    payload["state_dict"] = {k: v.detach().to("cpu", copy=True) for k, v in payload["state_dict"].items()}
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    atomic_write_bytes(path, buffer.getbuffer())


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint read back and validated: its config, and the model rebuilt with its weights."""

    path: Path
    config: TrainConfig
    model: nn.Module
    payload: dict[str, Any]

    @property
    def step(self) -> int:
        """The training steps behind these weights."""
        return int(self.payload.get("step", 0))

    @property
    def finished(self) -> bool:
        """Written at the end of a completed run (not a periodic checkpoint or a snapshot taken on the way)."""
        summary = self.payload.get("summary")
        return isinstance(summary, dict) and summary.get("status") == "completed"

    def run_status(self) -> str | None:
        """The status of the run directory the checkpoint sits in, if it sits in one."""
        try:
            return read_summary(self.path.parent).get("status")
        except CheckpointError:
            return None

    def provenance(self) -> dict[str, Any]:
        """Where these weights come from, for results: the step, the run's plan and whether it finished."""
        return {
            "step": self.step,
            "planned_batches": self.config.batches,
            "finished": self.finished,
            "run_status": self.run_status(),
        }

    def describe(self) -> str:
        """One line: the network, and the step its weights come from, saying so when the run did not finish."""
        c = self.config
        text = f"bn={c.bn}, seed {c.seed}, after {self.step} of {c.batches} planned training steps"
        if self.finished:
            return text
        status = self.run_status()
        why = f"its run is {status}" if status not in (None, "completed") else "it was saved during training"
        return f"{text}; NOT a finished run ({why}): these are its weights after {self.step} steps"


def checkpoint_path(path: str | os.PathLike) -> Path:
    """The checkpoint file: ``path`` itself, or the checkpoint.pt of the run directory ``path``."""
    path = Path(path)
    return path / CHECKPOINT if path.is_dir() else path


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """A bnlab checkpoint's payload, given the file or its run directory; never executes code from it."""
    path = checkpoint_path(path)
    if not path.is_file():
        raise CheckpointError(
            f"no checkpoint at {path}; pass a run directory written by `bnlab train` "
            "(it holds checkpoint.pt once the run completes) or the checkpoint file itself."
        )
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except OSError as err:
        raise CheckpointError(f"cannot read {path}: {err.strerror or err}") from None
    except Exception as err:  # torch raises many types for a damaged or foreign file
        first = " ".join(str(err).split()).split(". ")[0][:160]  # torch's own advice (weights_only=False) is unsafe
        raise CheckpointError(
            f"{path} is not a bnlab checkpoint ({type(err).__name__}: {first}); pass a run directory, or a "
            "checkpoint file written by bnlab"
        ) from None
    _check_format(path, payload, CHECKPOINT_FORMAT)
    if not isinstance(payload.get("state_dict"), dict):
        raise CheckpointError(f"{path} has no state_dict of weights")
    return payload


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu") -> Checkpoint:
    """Rebuild the network of a checkpoint (file or run directory), validated before and after building.

    Before: the config is checked against TrainConfig's schema and bounds, so a hostile or mistaken
    one (an unknown key, depth 100000) is refused by name instead of exhausting memory. After: every
    weight must have the shape the network expects (a one-line error names the first that does not),
    and non-finite weights are refused, naming the tensor.
    """
    from bnlab.models import build_network

    path = checkpoint_path(path)
    payload = load_checkpoint(path)
    config = _config(payload, path)
    try:
        model = build_network(config)
    except UsageError as err:
        raise CheckpointError(f"{path}: {err}") from None
    if payload.get("folded"):  # written by `bnlab fold`: batch norm folded into the layers before it
        from bnlab.nn.fold import folded_layout

        try:
            folded_layout(model, payload["folded"])
        except (AttributeError, TypeError, ValueError) as err:
            raise CheckpointError(f"{path}: its folded layers do not match a {config.model}: {err}") from None
    expected = model.state_dict()
    state = payload["state_dict"]
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: weights do not match a {config.model} with bn={config.bn}: "
            + "; ".join(
                p
                for p in (
                    f"missing {missing[:3]}" if missing else "",
                    f"unexpected {unexpected[:3]}" if unexpected else "",
                )
                if p
            )
        )
    for key, value in expected.items():
        stored = state[key]
        if not isinstance(stored, torch.Tensor) or stored.shape != value.shape:
            shape = list(stored.shape) if isinstance(stored, torch.Tensor) else type(stored).__name__
            raise CheckpointError(f"{path}: {key} has shape {shape}, the network expects {list(value.shape)}")
        if stored.is_floating_point() and not torch.isfinite(stored).all():
            raise CheckpointError(
                f"{path}: {key} holds NaN or infinite values; the run diverged before this checkpoint"
            )
    model.load_state_dict(state)
    return Checkpoint(path, config, model.to(device).eval(), payload)
