"""Run directories: what a training run leaves on disk, written so that nothing is lost.

    config.json      the TrainConfig and model hyper-parameters, written before the first step
    metrics.jsonl    one JSON object per line, appended and flushed as the run goes:
                     {"event": "eval", "batch": 0, "split": "validation", "loss": .., "accuracy": ..}
                     {"event": "step", "batch": 17, "loss": ..}  (every batch's training loss)
    summary.json     status ("running", "completed", "diverged", "interrupted", "failed") and the
                     final figures; rewritten atomically, so it is always a complete JSON document
    checkpoint.pt    {"format", "version", "config", "hparams", "state_dict", "summary"}, written
                     atomically at the end of a completed run

A run killed at any point leaves valid files: every line of metrics.jsonl but possibly the last
is complete (``read_metrics`` skips a torn last line), and the other files are replaced whole.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from bnlab.errors import CheckpointError

CHECKPOINT_FORMAT = "bnlab.checkpoint"
CHECKPOINT_VERSION = 1
CONFIG, METRICS, SUMMARY, CHECKPOINT = "config.json", "metrics.jsonl", "summary.json", "checkpoint.pt"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _temporary_beside(path: Path) -> tuple[int, str]:
    """A temporary file next to ``path`` with the permissions a plain open() would give (mkstemp's are 0600)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.chmod(tmp, 0o666 & ~_umask())
    return fd, tmp


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary file beside ``path`` and rename it over ``path``."""
    fd, tmp = _temporary_beside(path)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"cannot read {path}: {err}") from err


class MetricsLog:
    """Append-only JSON-lines file; every record is flushed as soon as it is written."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(path, "a", encoding="utf-8")  # noqa: SIM115 (closed by close())

    def write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def read_metrics(path: Path) -> Iterator[dict[str, Any]]:
    """The records of a metrics.jsonl; a torn last line (from a killed run) is skipped."""
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                yield json.loads(line)
            except json.JSONDecodeError:
                if line.endswith("\n"):  # only a torn final line is expected; anything else is damage
                    raise CheckpointError(f"{path}: corrupt line {line[:60]!r}") from None


def save_checkpoint(path: Path, *, config: dict, hparams: dict, state_dict: dict, summary: dict) -> None:
    payload = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "config": config,
        "hparams": hparams,
        "state_dict": {k: v.detach().cpu() for k, v in state_dict.items()},
        "summary": summary,
    }
    fd, tmp = _temporary_beside(path)
    os.close(fd)
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load a bnlab checkpoint, given the file or the run directory holding it."""
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT
    if not path.is_file():
        raise CheckpointError(
            f"no checkpoint at {path}; pass a run directory written by `bnlab train` "
            "(it holds checkpoint.pt once the run completes) or the checkpoint file itself."
        )
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for a damaged or foreign file
        raise CheckpointError(f"{path} is not a readable checkpoint ({type(err).__name__}: {err})") from err
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not a bnlab checkpoint (no format marker {CHECKPOINT_FORMAT!r}).")
    if payload.get("version") != CHECKPOINT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint version {payload.get('version')}; this bnlab reads version {CHECKPOINT_VERSION}."
        )
    return payload
