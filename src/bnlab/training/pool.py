"""Worker processes that train independent items side by side: one per usable CPU core, one thread each.

    run_in_workers("bnlab.training.runs.train_item", items, workers=2, shared=(data, ...), done=...)

Why processes: on a small CPU, a small network's step gains little from a second thread (the paper's
MLP: 1.55 ms a step with two threads, 1.09 ms with one, on this project's 2-core machine), so two runs
trained side by side, one thread each, do nearly twice the work of one run given both cores. The
items (a run, or a stack of runs) are independent and each writes its own run directories, so where
one trains changes nothing but the thread count's rounding.

Every stop is accounted for, as in one process:
- Ctrl-C reaches every process of the terminal's group; SIGTERM to the parent is passed on to the
  workers as SIGINT. A worker interrupted mid-item records its runs as interrupted (``train`` does)
  and leaves quietly (``bnlab.worker``: its handlers come before any heavy import); the parent raises
  ``KeyboardInterrupt`` once the workers are gone.
- A worker whose item fails reports the error in one line; the parent stops the others and raises
  ``BnlabError`` with it. A worker that dies (SIGKILL, out of memory) is noticed within a second.
- A worker busy with an item gets ``GRACE`` seconds to write its last records, then SIGKILL; an idle one
  (still starting, or out of items) is killed at once. No process outlives the call.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import sys
import time
import types
from collections.abc import Callable, Iterator, Sequence
from multiprocessing.connection import wait
from multiprocessing.reduction import ForkingPickler
from typing import Any

import torch.multiprocessing  # noqa: F401 (tensors go to the workers through shared memory)

from bnlab import worker
from bnlab.errors import BnlabError, UsageError
from bnlab.training.distributed import usable_cores

__all__ = ["GRACE", "run_in_workers", "usable_cores"]

GRACE = 10.0  # seconds a stopped worker has to record its runs as interrupted before it is killed


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def run_in_workers(
    fn: str,
    items: Sequence[Any],
    *,
    workers: int,
    shared: tuple = (),
    done: Callable[[int], None] = lambda index: None,
    lost: Callable[[int, str], None] = lambda index, why: None,
) -> None:
    """Call ``fn(item, *shared)`` for every item in ``workers`` processes, ``done(index)`` as each item is done.

    ``fn`` is a module-level function's dotted name (the workers import it themselves); ``shared`` goes to
    every worker once (tensors through shared memory, not copied). Items are taken in order, each by the
    next free worker. ``lost(index, why)`` is called for an item whose worker died while on it (its runs
    could not say so themselves).
    """
    count = min(workers, len(items))
    try:  # pickled here, once per worker (a shared tensor's file descriptor can be fetched once): a failure is ours
        payloads = [bytes(ForkingPickler.dumps((fn, shared, torch_threads(workers, len(items))))) for _ in range(count)]
    except Exception as err:  # an unpicklable option, or no shared memory for the data (a small /dev/shm)
        raise BnlabError(
            f"cannot hand the work to worker processes ({type(err).__name__}: {' '.join(str(err).split())[:200]}); "
            "train in this process instead (--workers 1)"
        ) from None
    context = multiprocessing.get_context("spawn")  # not torch's: a worker starts without importing torch
    with _quiet_resource_tracker():
        tasks = context.Queue()
    for task in enumerate(items):
        tasks.put(task)
    for _ in range(count):
        tasks.put(None)
    pipes = [context.Pipe() for _ in range(count)]
    processes = [context.Process(target=worker.main, args=(child, tasks), daemon=True) for _, child in pipes]
    busy: dict[int, int] = {}  # worker -> the item it works on
    previous = signal.signal(signal.SIGTERM, _interrupt)  # the parent's SIGTERM stops the workers too
    try:
        with _main_left_alone():
            for process in processes:
                process.start()
        for (conn, child), payload in zip(pipes, payloads, strict=True):
            child.close()  # the worker's end, in the worker now
            conn.send_bytes(payload)
        remaining = len(items)
        reports = {conn: w for w, (conn, _) in enumerate(pipes)}
        while remaining:
            ready = wait([*reports, *(p.sentinel for p in processes)], timeout=1.0)
            for conn in [r for r in ready if r in reports]:
                try:
                    kind, detail, error = conn.recv()
                except EOFError:  # the worker is gone: its sentinel says how
                    del reports[conn]
                    continue
                w = reports[conn]
                if kind == "took":
                    busy[w] = detail
                    continue
                busy.pop(w, None)
                if kind == "done":
                    remaining -= 1
                    done(detail)
                elif kind == "interrupted":
                    raise KeyboardInterrupt
                elif error == "usage":
                    raise UsageError(detail)
                else:
                    raise BnlabError(f"a worker's run failed: {detail}")
            dead = [w for w, p in enumerate(processes) if not p.is_alive() and p.exitcode != 0]
            if dead and not any(conn.poll() for conn in reports):  # its last reports read first
                why = f"its worker process died ({_exit_text(processes[dead[0]].exitcode)})"
                if dead[0] in busy:
                    lost(busy.pop(dead[0]), why)
                raise BnlabError(f"{why}; the lab stopped")
    finally:
        signal.signal(signal.SIGTERM, previous)
        _stop(processes, busy)
        for conn, _ in pipes:
            conn.close()


def torch_threads(workers: int, items: int) -> int:
    """Threads per worker: the usable cores shared out, at least one."""
    return max(1, usable_cores() // min(workers, items))


@contextlib.contextmanager
def _quiet_resource_tracker() -> Iterator[None]:
    """multiprocessing's resource tracker, started with the first queue, warns of "leaked semaphores" when a
    worker was killed holding a queue's lock, which is how every stopped worker goes; nothing leaks (the
    parent unlinks them), so it is started with that warning off."""
    previous = os.environ.get("PYTHONWARNINGS")
    quiet = "ignore::UserWarning:multiprocessing.resource_tracker"
    os.environ["PYTHONWARNINGS"] = ",".join(filter(None, [previous, quiet]))
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("PYTHONWARNINGS", None)
        else:
            os.environ["PYTHONWARNINGS"] = previous


@contextlib.contextmanager
def _main_left_alone() -> Iterator[None]:
    """Start workers without their re-running the caller's script: a spawned process imports the parent's
    ``__main__`` from its file, so a script calling the lab at its top level, without an ``if __name__ ==
    "__main__"`` guard, would start the lab again in every worker. The workers need nothing from it (their
    entry is ``bnlab.worker``), so while they start, ``__main__`` is a module with no file."""
    main = sys.modules["__main__"]
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        yield
    finally:
        sys.modules["__main__"] = main


def _stop(processes: list[Any], busy: dict[int, int]) -> None:
    """Kill the idle workers; ask the busy ones to stop (SIGINT), give them ``GRACE`` seconds, then kill them."""
    started = [p for p in processes if p.pid is not None and p.is_alive()]
    for process in started:
        os.kill(process.pid, signal.SIGINT if processes.index(process) in busy else signal.SIGKILL)
    deadline = time.monotonic() + GRACE
    for process in started:
        process.join(max(0.0, deadline - time.monotonic()))
        if process.is_alive():
            process.kill()
            process.join()


def _exit_text(code: int | None) -> str:
    if code is not None and code < 0:
        return f"killed by signal {signal.Signals(-code).name}"
    return f"exit code {code}"
