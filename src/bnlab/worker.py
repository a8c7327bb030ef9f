"""The entry point of bnlab's worker processes (``bnlab.training.pool``): their signal handlers first, then the work.

A spawned worker imports what its target's arguments need before its code runs, and torch takes seconds
to import: a Ctrl-C in that time would print a traceback from deep inside the import. So this module
imports nothing heavy, its arguments are a task queue and a pipe to the parent, and the function to
call and the data it shares arrive, pickled, on the pipe once the handlers are in place. Reports go
back on the pipe, written at once (a queue's feeder thread could lose the last one to a SIGKILL). A
watchdog thread ends the worker as an interrupt would if its parent dies (it would otherwise train
everything left in the queue alone).
"""

from __future__ import annotations

import importlib
import os
import signal
import threading
import time
import traceback
from typing import Any


def _interrupt_once(signum: int, frame: object) -> None:
    """The first SIGINT or SIGTERM interrupts the worker; later ones must not cut short its last records."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise KeyboardInterrupt


def _watch(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(1.0)
    os.kill(os.getpid(), signal.SIGINT)  # a real signal, to wake a blocked call: the item records an interrupt


def main(parent: Any, tasks: Any) -> None:
    """Take (function name, shared arguments, threads), pickled, from the ``parent`` pipe, then items from the
    common ``tasks`` queue until None, reporting on the pipe as each is taken and done."""
    signal.signal(signal.SIGINT, _interrupt_once)
    signal.signal(signal.SIGTERM, _interrupt_once)
    threading.Thread(target=_watch, args=(os.getppid(),), daemon=True).start()
    try:
        from multiprocessing.reduction import ForkingPickler

        import torch
        import torch.multiprocessing

        name, shared, threads = ForkingPickler.loads(parent.recv_bytes())
        torch.set_num_threads(threads)
        module, _, function = name.rpartition(".")
        fn = getattr(importlib.import_module(module), function)
        while (task := tasks.get()) is not None:
            index, item = task
            parent.send(("took", index, ""))
            fn(item, *shared)
            parent.send(("done", index, ""))
    except KeyboardInterrupt:
        parent.send(("interrupted", -1, ""))
    except Exception as err:  # the item's own failure, reported by the parent in one line
        detail = traceback.format_exc() if os.environ.get("BNLAB_DEBUG") else ""
        message = f"{' '.join(str(err).split())}{detail}"
        parent.send(("failed", message, "usage" if _usage(err) else ""))


def _usage(err: Exception) -> bool:
    from bnlab.errors import UsageError

    return isinstance(err, UsageError)
