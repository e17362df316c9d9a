"""Writing figure files safely: never a 0-byte or half-written file under the final name."""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

# errors that mean the chosen path is wrong (the user can pick another), not that the machine failed
PATH_ERRNOS = frozenset({errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR, errno.ENOENT, errno.ENAMETOOLONG})


class FigurePathError(ValueError):
    """A figure path that cannot be written: a folder that is missing, read-only or a file, or a name too long."""


def _name_max(folder: Path) -> int:
    try:
        return os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError):
        return 255


def check_writable(path: str | os.PathLike) -> None:
    """Raise FigurePathError unless a file can be created at ``path`` (probed with a short-lived file).

    Checked before drawing, so a bad ``--out`` fails in a fraction of a second. Probing beats
    ``os.access``: it also sees read-only mounts, and root ignores permission bits.
    """
    path = Path(path)
    folder = path.parent
    if not folder.exists():
        raise FigurePathError(f"{path}: folder {folder} does not exist; create it or choose another path")
    if not folder.is_dir():
        raise FigurePathError(f"{path}: {folder} is a file, not a folder; choose another path")
    if len(os.fsencode(path.name)) > _name_max(folder):
        raise FigurePathError(f"{path}: the file name is too long ({len(os.fsencode(path.name))} bytes); shorten it")
    if path.is_dir():
        raise FigurePathError(f"{path} is a folder; give a file name")
    probe = folder / f".dyn-probe-{secrets.token_hex(4)}"
    try:
        os.close(os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
    except OSError as e:
        if e.errno in PATH_ERRNOS:
            raise FigurePathError(f"{path}: cannot write in {folder} ({e.strerror}); choose another path") from None
        raise
    os.unlink(probe)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """Open a temporary file beside ``path`` for writing; on success it replaces ``path``, on any error it is removed.

    The temporary name is short, so a final name near the length limit still works.
    """
    path = Path(path)
    tmp = path.parent / f".dyn-{secrets.token_hex(6)}.tmp"
    fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)  # 0o666: the umask applies, as for open()
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def save_figure(fig, path: str | os.PathLike, dpi: int = 150) -> Path:
    """Save a matplotlib figure atomically, in the format its extension names (.png, .pdf, .svg)."""
    path = Path(path)
    fmt = path.suffix.lower().lstrip(".")
    if not fmt:
        raise FigurePathError(f"{path}: no extension; use .png, .pdf or .svg")
    if fmt not in fig.canvas.get_supported_filetypes():
        raise FigurePathError(f"{path}: matplotlib cannot write .{fmt} files; use .png, .pdf or .svg")
    if not path.parent.is_dir():
        raise FigurePathError(f"{path}: folder {path.parent} does not exist; create it or choose another path")
    with atomic_file(path) as f:
        fig.savefig(f, format=fmt, dpi=dpi)
    return path
