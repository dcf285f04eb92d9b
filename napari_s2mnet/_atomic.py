"""Atomic file replacement shared by every writer (labels, tables, model files).

A file is written to a temporary file in the destination folder and then moved over the
destination with :func:`os.replace`, so a failure (full disk, killed process) leaves the previous
file intact. Three details make the result behave like a plain ``open(path, "w")``:

* a new file gets the usual permissions, ``0o666`` minus the umask (``mkstemp`` would give 0600,
  unreadable by the group);
* an overwritten file keeps its permission bits;
* a symlink is written through: its target is replaced (atomically), the link stays. Anything
  that is not a regular file (a device such as ``/dev/full``, a pipe, a socket) is refused
  rather than replaced by a regular file.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
from collections.abc import Iterator
from pathlib import Path


def resolve_target(path: str | os.PathLike) -> Path:
    """The regular file a write to ``path`` should replace (symlinks followed).

    Raises:
        IsADirectoryError: ``path`` is a folder.
        ValueError: ``path`` exists but is not a regular file (device, pipe, socket).
    """
    path = Path(path)
    target = Path(os.path.realpath(path)) if path.is_symlink() else path
    try:
        st = target.stat()
    except FileNotFoundError:
        return target
    if stat.S_ISDIR(st.st_mode):
        raise IsADirectoryError(f"{path} is a folder; give a file name inside it.")
    if not stat.S_ISREG(st.st_mode):
        raise ValueError(
            f"{path} exists and is not a regular file (a device, pipe or socket); it is not "
            "replaced. Choose a file name."
        )
    return target


def new_temp_file(target: Path) -> Path:
    """Create an empty temporary file next to ``target`` with umask-following permissions."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    for _ in range(100):
        tmp = target.parent / f".{target.name}.{secrets.token_hex(6)}.tmp{target.suffix}"
        try:
            fd = os.open(tmp, flags, 0o666)  # the kernel applies the umask, like open(.., "w")
        except FileExistsError:
            continue
        os.close(fd)
        return tmp
    raise FileExistsError(
        f"Could not create a temporary file next to {target}."
    )  # pragma: no cover


def commit(tmp: Path, target: Path) -> None:
    """Move ``tmp`` over ``target``, keeping the permission bits of an existing ``target``."""
    with contextlib.suppress(FileNotFoundError):
        os.chmod(tmp, stat.S_IMODE(target.stat().st_mode))
    os.replace(tmp, target)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path to write; on success it replaces ``path`` (see the module doc).

    On any error the temporary file is removed and ``path`` is left as it was.
    """
    target = resolve_target(path)
    tmp = new_temp_file(target)
    try:
        yield tmp
        commit(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
