"""Output files and directories of the command lines: checked before any work starts, written atomically.

An output file is refused (``OutputError``, one line naming the argument) when its path ends in a slash,
names an existing directory, symbolic link, device, FIFO or socket, lies under something that is not a
directory, or its directory cannot be written. ``atomic_write`` writes a temporary file beside the target
(mode 0666 minus the umask, as ``open`` would create it), syncs it and renames it over the target only
while the target is still absent or a regular file: a device node such as /dev/null or a link is never
replaced, and a failed write (a full disk, Ctrl-C) leaves the target as it was.
"""
from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path


class OutputError(ValueError):
    """An output path that cannot be written as asked (message: one line naming the argument)."""


def _kind(mode: int) -> str | None:
    """What a non-regular file is, None for a regular file."""
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISLNK(mode):
        return "a symbolic link"
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "a FIFO" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode) else "not a regular file"


def _check_ancestor(p: Path, arg: str) -> None:
    """The nearest existing ancestor of ``p`` must be a writable directory (missing ones are created)."""
    anc = p.parent
    while not os.path.lexists(anc) and anc != anc.parent:
        anc = anc.parent
    if not anc.is_dir():
        raise OutputError(f"{arg}: {p} lies under {anc}, which is not a directory")
    if not os.access(anc, os.W_OK | os.X_OK):
        raise OutputError(f"{arg}: {p}: directory {anc} is not writable")


def check_output_file(path: str | os.PathLike, arg: str) -> Path:
    """``path`` as a Path when a file may be written there (absent, or an existing regular file)."""
    text = os.fspath(path)
    if not text:
        raise OutputError(f"{arg}: empty path")
    if text.endswith(("/", os.sep, "/.", "/..")) or text in (".", ".."):
        raise OutputError(f"{arg}: {text} names a directory; give a file name")
    p = Path(text)
    try:
        st = os.lstat(p)
    except (FileNotFoundError, NotADirectoryError):  # absent, or under a file (said below)
        st = None
    except OSError as exc:  # e.g. a name too long
        raise OutputError(f"{arg}: {p}: {exc.strerror}") from None
    if st is not None:
        kind = _kind(st.st_mode)
        if kind:
            raise OutputError(f"{arg}: {p} is {kind}; refusing to replace it (give a new file name)")
    _check_ancestor(p, arg)
    return p


def check_output_dir(path: str | os.PathLike, arg: str) -> Path:
    """``path`` as a Path when it is an existing directory or can be created as one."""
    text = os.fspath(path)
    if not text:
        raise OutputError(f"{arg}: empty path")
    p = Path(text)
    if os.path.lexists(p):
        if not p.is_dir():
            raise OutputError(f"{arg}: {p} exists and is not a directory")
        if not os.access(p, os.W_OK | os.X_OK):
            raise OutputError(f"{arg}: directory {p} is not writable")
        return p
    _check_ancestor(p, arg)
    return p


def make_dir(path: str | os.PathLike, arg: str) -> Path:
    """``check_output_dir`` then create it (and its parents); OSError -> OutputError."""
    p = check_output_dir(path, arg)
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"{arg}: cannot create {p}: {exc.strerror or exc}") from None
    return p


def file_mode() -> int:
    """0666 minus the process umask: the mode ``open(path, 'w')`` gives a new file."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o22)  # no /proc: read the umask by setting it (and put it back at once)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write(path: str | os.PathLike, write, arg: str = "output") -> Path:
    """Call ``write(tmp_path)``, then rename tmp_path to ``path``; nothing half-written is left behind.

    ``path`` is checked with ``check_output_file`` (before writing and again just before the rename); an
    OSError while writing (ENOSPC, EACCES ...) becomes one ``OutputError`` line naming ``arg`` and the path.
    """
    return atomic_write_files({path: write}, arg)[0]


def atomic_write_files(writers: dict, arg: str = "output") -> list[Path]:
    """``atomic_write`` of several files as one: every file is written to its temporary name first and only
    when all are complete are they renamed into place, so a failure replaces none of them (results that
    belong together, e.g. a benchmark's JSON and Markdown). Directories created for them are removed again
    on failure."""
    paths = [check_output_file(p, arg) for p in writers]
    created: list[Path] = []
    tmps: list[str] = []
    try:
        for p in paths:
            missing = [d for d in [p.parent, *p.parent.parents] if not os.path.lexists(d)]
            p.parent.mkdir(parents=True, exist_ok=True)
            created += reversed(missing)
            fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
            os.close(fd)
            tmps.append(tmp)
        mode = file_mode()
        for tmp, write in zip(tmps, writers.values()):
            write(tmp)
            os.chmod(tmp, mode)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        for p in paths:  # still absent or regular files (not swapped for a link or a device)
            check_output_file(p, arg)
        for tmp, p in zip(tmps, paths):
            os.replace(tmp, p)
    except BaseException as exc:
        for tmp in tmps:
            _unlink(tmp)
        for d in reversed(created):
            try:
                d.rmdir()
            except OSError:
                pass
        if isinstance(exc, OSError):
            where = next((p for p in paths if exc.filename and str(p.parent) in str(exc.filename)), paths[0])
            raise OutputError(f"{arg}: cannot write {where}: {exc.strerror or exc}") from None
        raise
    return paths


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


__all__ = ["OutputError", "atomic_write", "atomic_write_files", "check_output_dir", "check_output_file", "file_mode", "make_dir"]
