"""The ``bnlab`` command, and its one error boundary.

Exit status: 0 success; 1 a problem explained on stderr (missing or corrupt data, a diverged run,
an unreadable checkpoint, an OS error naming its path, a ``bnlab check`` finding); 2 bad usage;
130 interrupted (Ctrl-C or SIGTERM; files already written stay valid). Errors are one line on
stderr; ``BNLAB_DEBUG=1`` adds the traceback. Results go to stdout (``--json`` for machines).

    run.py    train, evaluate, recalibrate, summary: one network
    lab.py    reproduce, benefits, family, precise, rnn: experiments
    tools.py  check, bench
"""

from __future__ import annotations

import os
import signal
import sys
import traceback
from collections.abc import Sequence

from bnlab.cli import lab, run, tools
from bnlab.cli.args import Parser
from bnlab.errors import BnlabError, Interrupted, UsageError
from bnlab.version import __version__


def build_parser() -> Parser:
    parser = Parser(prog="bnlab", description="Batch normalization you can run, see and trust.")
    parser.add_argument("--version", action="version", version=f"bnlab {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser, required=True)
    for module in (run, lab, tools):
        module.add_commands(sub)
    return parser


def _interrupt(signum: int, frame: object) -> None:
    raise Interrupted  # SIGTERM ends a run as Ctrl-C does: its status recorded, its files intact


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv  # what the workers of a multi-process run are started with
    previous = {signum: signal.signal(signum, _interrupt) for signum in (signal.SIGINT, signal.SIGTERM)}
    name = f"bnlab {args.command}"
    try:
        return args.func(args)
    except UsageError as err:
        return _fail(name, f"error: {err}", 2)
    except BnlabError as err:
        return _fail(name, str(err), 1)
    except KeyboardInterrupt:
        return _fail(name, "interrupted; files already written are intact", 130)
    except OSError as err:  # disk full, permissions, a folder where a file was expected...
        where = f": {err.filename}" if err.filename else ""
        return _fail(name, f"{err.strerror or err}{where}", 1)
    except MemoryError:
        return _fail(name, OUT_OF_MEMORY, 1)
    except Exception as err:  # a bug in bnlab: say so in one line, not in a traceback
        if _out_of_memory(err):  # PyTorch's allocators raise RuntimeErrors, not MemoryError
            return _fail(name, OUT_OF_MEMORY, 1)
        return _fail(name, f"internal error: {type(err).__name__}: {err} (BNLAB_DEBUG=1 shows where)", 1)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


OUT_OF_MEMORY = "out of memory; use smaller sizes (batch size, samples, network)"


def _out_of_memory(err: Exception) -> bool:
    return type(err).__name__ == "OutOfMemoryError" or (
        isinstance(err, RuntimeError) and "can't allocate memory" in str(err)
    )


def _fail(name: str, message: str, status: int) -> int:
    if os.environ.get("BNLAB_DEBUG"):
        traceback.print_exc()
    print(f"{name}: {' '.join(message.split())}", file=sys.stderr)
    return status


__all__ = ["build_parser", "main"]
