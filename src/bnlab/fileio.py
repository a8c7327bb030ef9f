"""Files that are never half-written: write beside the target, then rename over it.

A reader (or a run killed mid-write) sees the old file or the new one, never a torn one. Files get
the permissions a plain ``open()`` would give them (``mkstemp``'s are 0600).

A write that fails (a full disk or quota, a file-size limit, a read-only file system) removes its
temporary file, so the space it took is free again, and raises ``OSError`` naming the *target*
file, the one the user knows, not the temporary name.
"""

from __future__ import annotations

import errno
import json
import os
import tempfile
from pathlib import Path
from typing import Any

OUT_OF_SPACE = (errno.ENOSPC, errno.EDQUOT)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def naming(err: OSError, path: Path) -> OSError:
    """``err`` as an OSError of the same kind that names ``path``."""
    return OSError(err.errno, err.strerror or str(err), str(path))


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path``, flush it to disk, and rename it over ``path``."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)  # same file system as the target: the rename is atomic
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.chmod(tmp, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        raise naming(err, path) from err
    except BaseException:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        raise


def rewrite_in_place(path: Path, data: bytes) -> None:
    """Overwrite ``path``'s contents without a second copy: the last resort on a full disk, where the atomic
    write has no room for its temporary file but the old contents' blocks can be reused. Not atomic."""
    try:
        with open(path, "r+b") as f:
            f.truncate(0)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except OSError as err:
        raise naming(err, path) from err


def write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, json_bytes(obj))


def json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True, allow_nan=False) + "\n").encode()


def read_json(path: Path) -> Any:
    """The JSON document at ``path``; OSError or ValueError if it cannot be read."""
    return json.loads(Path(path).read_text())
