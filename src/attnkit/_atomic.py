"""One atomic file write, for the core's figures and the apps' checkpoints.

A reader sees the old file or the new one, never a half-written one: the bytes go to a
temporary file beside the target, are flushed to disk, and the file is renamed into place with
``os.replace`` (atomic within one file system).
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Callable

__all__ = ["atomic_write"]


def atomic_write(path, write: Callable[[object], None]) -> Path:
    """Call ``write(binary_file)`` on a temporary file beside ``path``, then rename it to ``path``.

    Args:
        path: the destination; missing parent directories are created.
        write: fills the open binary file.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        Whatever ``write`` raises; the temporary file is removed and an existing ``path`` is
        left untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    # 0o666 lets the umask choose the mode, as for any new file (mkstemp would force 0o600).
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())  # the bytes are on disk before the name points at them
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path
