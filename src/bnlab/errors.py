"""Errors bnlab raises on purpose.

Every message names the problem and the fix. The CLI prints ``str(error)`` on one line to stderr
instead of a traceback; ``UsageError`` exits with status 2, every other ``BnlabError`` with 1.
"""


class BnlabError(Exception):
    """Base class: something the user can fix, explained in the message."""


class UsageError(BnlabError, ValueError):
    """A bad argument or option value (exit status 2 from the CLI)."""


class DataError(BnlabError):
    """MNIST files missing, corrupt, truncated or malformed."""


class CheckpointError(BnlabError):
    """A checkpoint or run directory that cannot be read back."""


class TrainingDiverged(BnlabError):
    """The loss became NaN or infinite; the run stopped and kept what it had written."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM really received by the ``bnlab`` command (its signal handlers raise this), as
    opposed to a ``KeyboardInterrupt`` that user code raises itself: ``bnlab check`` reports the latter
    as the user's module stopping, and lets the former end the command with status 130."""
