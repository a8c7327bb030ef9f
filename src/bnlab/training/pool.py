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
import os
import queue
import signal
import sys
import time
import types
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch.multiprocessing as mp

from bnlab import worker
from bnlab.errors import BnlabError

__all__ = ["GRACE", "run_in_workers", "usable_cores"]

GRACE = 10.0  # seconds a stopped worker has to record its runs as interrupted before it is killed


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def run_in_workers(
    fn: str,
    items: Sequence[Any],
    *,
    workers: int,
    shared: tuple = (),
    done: Callable[[int], None] = lambda index: None,
) -> None:
    """Call ``fn(item, *shared)`` for every item in ``workers`` processes, ``done(index)`` as each item is done.

    ``fn`` is a module-level function's dotted name (the workers import it themselves); ``shared`` goes to
    every worker once (tensors through shared memory, not copied). Items are taken in order, each by the
    next free worker.
    """
    context = mp.get_context("spawn")
    tasks, results = context.Queue(), context.Queue()
    for task in enumerate(items):
        tasks.put(task)
    count = min(workers, len(items))
    for _ in range(count):
        tasks.put(None)
    threads = max(1, usable_cores() // count)
    setups = [context.Queue() for _ in range(count)]
    processes = [context.Process(target=worker.main, args=(s, tasks, results), daemon=True) for s in setups]
    busy: dict[int, int] = {}  # pid -> the item it works on
    previous = signal.signal(signal.SIGTERM, _interrupt)  # the parent's SIGTERM stops the workers too
    try:
        with _main_left_alone():
            for process in processes:
                process.start()
        for setup in setups:
            setup.put((fn, shared, threads))
        remaining = len(items)
        while remaining:
            try:
                kind, detail, pid = results.get(timeout=1.0)
            except queue.Empty:
                dead = [p for p in processes if not p.is_alive() and p.exitcode != 0]
                if dead:
                    raise BnlabError(
                        f"a worker process died ({_exit_text(dead[0].exitcode)}); the lab stopped"
                    ) from None
                continue
            if kind == "took":
                busy[pid] = detail
            elif kind == "done":
                busy.pop(pid, None)
                remaining -= 1
                done(detail)
            elif kind == "interrupted":
                busy.pop(pid, None)
                raise KeyboardInterrupt
            else:
                busy.pop(pid, None)
                raise BnlabError(f"a worker's run failed: {detail}")
    finally:
        signal.signal(signal.SIGTERM, previous)
        _stop(processes, busy)


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
        os.kill(process.pid, signal.SIGINT if process.pid in busy else signal.SIGKILL)
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
