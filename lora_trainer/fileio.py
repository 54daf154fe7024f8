"""Atomic file writes: a reader (or a crash) never sees a half-written file.

Everything the trainer writes goes to a temporary name in the same folder, is flushed and fsynced, and is then
renamed over the final name (`os.replace` is atomic on POSIX and Windows). A crash leaves either the old file or
the new one, plus at most a stray hidden `.tmp-*` file that the next run removes (`clean_stale_temporaries`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator

TMP_PREFIX = ".tmp-"


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """Yield a temporary path beside `path`; on success it replaces `path`, on error it is removed."""
    folder = os.path.dirname(os.path.abspath(path)) or "."
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f"{TMP_PREFIX}{os.path.basename(path)}.", dir=folder)
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual permissions
        fsync_file(tmp)
        os.replace(tmp, path)
        fsync_dir(folder)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def atomic_write_bytes(path: str, data: bytes) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)


def atomic_write_text(path: str, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_with(path: str, writer: Callable[[str], None]) -> None:
    """Call `writer(tmp_path)` (e.g. torch.save, Image.save) and move the result into place."""
    with atomic_path(path) as tmp:
        writer(tmp)


def clean_stale_temporaries(folder: str) -> int:
    """Remove `.tmp-*` files and folders a killed process left in `folder`; returns how many."""
    if not os.path.isdir(folder):
        return 0
    removed = 0
    for name in os.listdir(folder):
        if not name.startswith(TMP_PREFIX):
            continue
        path = os.path.join(folder, name)
        with contextlib.suppress(OSError):
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
            removed += 1
    if removed:
        logging.getLogger(__name__).info("removed %d unfinished temporary file(s) from %s", removed, folder)
    return removed


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def fsync_file(path: str) -> None:
    """Flush a written file to the disk (a rename is only crash-safe after its content is)."""
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_dir(folder: str) -> None:
    """Flush a folder's entries (names created or renamed in it); a no-op where folders cannot be opened."""
    if os.name != "posix":
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
