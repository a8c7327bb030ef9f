"""The entry point of bnlab's worker processes (``bnlab.training.pool``): their signal handlers first, then the work.

A spawned worker imports what its target's arguments need before its code runs, and torch takes seconds
to import: a Ctrl-C in that time would print a traceback from deep inside the import. So this module
imports nothing heavy, its arguments are names and queues, and the function to call and the data it
shares arrive by the task queue once the handlers are in place.
"""

from __future__ import annotations

import importlib
import os
import signal
import traceback
from typing import Any


def _interrupt_once(signum: int, frame: object) -> None:
    """The first SIGINT or SIGTERM interrupts the worker; later ones must not cut short its last records."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise KeyboardInterrupt


def main(setup: Any, tasks: Any, results: Any) -> None:
    """Take (function name, shared arguments, threads) from this worker's ``setup`` queue, then items from the
    common ``tasks`` queue until None, reporting on ``results`` as each is taken and done."""
    signal.signal(signal.SIGINT, _interrupt_once)
    signal.signal(signal.SIGTERM, _interrupt_once)
    try:
        name, shared, threads = setup.get()
        import torch

        torch.set_num_threads(threads)
        module, _, function = name.rpartition(".")
        fn = getattr(importlib.import_module(module), function)
        while (task := tasks.get()) is not None:
            index, item = task
            results.put(("took", index, os.getpid()))
            fn(item, *shared)
            results.put(("done", index, os.getpid()))
    except KeyboardInterrupt:
        results.put(("interrupted", -1, os.getpid()))
    except Exception as err:  # the item's own failure, reported by the parent in one line
        detail = traceback.format_exc() if os.environ.get("BNLAB_DEBUG") else ""
        results.put(("failed", f"{type(err).__name__}: {' '.join(str(err).split())}{detail}", os.getpid()))
