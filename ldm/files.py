"""Writing files so that nothing already written is lost.

Every file this project writes goes through here: the content is written to a temporary file beside the target,
flushed to disk, given the permissions the user's umask asks for, and renamed into place, so a kill or a full
disk leaves the old file or the new one, never half of one. Numbered outputs (``00042.png``) are reserved with
an exclusive create, so two runs writing into one folder at the same time each get their own numbers.
"""
from __future__ import annotations

import errno
import os
import re
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional

try:  # POSIX: a writer holds a lock on its partial file, so a cleaner never removes one that is being written
    import fcntl
except ImportError:  # pragma: no cover - Windows: partial files are removed only once they are a day old
    fcntl = None

#: What a partial file (or folder) left by a killed writer looks like: ``.<name>.<random>.tmp`` (see
#: :func:`atomic_write`, :func:`atomic_folder`).
PARTIAL_GLOB = ".*.tmp"
#: Without file locks, a partial file this old is taken to be abandoned.
STALE_PARTIAL_S = 24 * 3600
#: Errors that mean "the disk (or the file-size limit) is full": reported as one line, never a traceback.
DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})


class OutputError(ValueError):
    """An output that would overwrite an input or another output; the message is one line."""


class DiskFullError(OSError):
    """Writing failed because the disk (or a file-size limit) is full; nothing half-written was left behind."""

    def __init__(self, code: int, message: str, filename: str | None = None) -> None:
        super().__init__(code, message, filename)
        self.message = message

    def __str__(self) -> str:
        return self.message


def sha256(path: str | os.PathLike) -> str:
    """The hex SHA-256 of a file's bytes, read in 1 MiB blocks."""
    import hashlib
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def is_disk_full(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in DISK_FULL_ERRNOS


def disk_full_message(exc: OSError, path: Optional[os.PathLike | str] = None) -> str:
    where = path or exc.filename or "a file"
    return f"{where}: cannot write: {os.strerror(exc.errno) if exc.errno else exc} (free some space and run again)"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def default_file_mode() -> int:
    """The mode ``open()`` would give a new file (0o644 under the usual umask), not mkstemp's private 0o600."""
    return 0o666 & ~_umask()


def default_dir_mode() -> int:
    return 0o777 & ~_umask()


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # some filesystems (and Windows) cannot open folders
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _full_disk_errno(partial: str) -> int | None:
    """Why a writer that hides the OS error (torch's zip writer says "unexpected pos") failed, if the disk or the
    file-size limit is what stopped it: ENOSPC / EFBIG, else None."""
    try:
        import resource  # POSIX only
    except ImportError:
        return None
    try:
        written = os.path.getsize(partial)
        soft, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
        if soft != resource.RLIM_INFINITY and written + 65536 >= soft:
            return errno.EFBIG
        st = os.statvfs(os.path.dirname(partial) or ".")
        if st.f_bavail * st.f_frsize < 1 << 20:
            return errno.ENOSPC
    except OSError:
        return None
    return None


def atomic_write(path: str | os.PathLike, write: Callable[[str], object]) -> Path:
    """Call ``write(tmp)`` to fill a temporary file beside ``path``, then move it to ``path`` in one step.

    On any error (a full disk included) the temporary file is removed and ``path`` keeps its old content; a full
    disk is raised as :class:`DiskFullError` naming ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        _lock(fd)  # held until the file is renamed or removed: a cleaner leaves it alone meanwhile
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, default_file_mode())
        os.replace(tmp, path)
    except BaseException as exc:
        code = exc.errno if is_disk_full(exc) else _full_disk_errno(tmp) if isinstance(exc, Exception) else None
        if os.path.exists(tmp):
            os.remove(tmp)
        if code is not None:
            raise DiskFullError(code, disk_full_message(OSError(code, os.strerror(code)), path), str(path)) from None
        raise
    finally:
        os.close(fd)
    _fsync_dir(path.parent)
    return path


@contextmanager
def atomic_folder(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary folder beside ``path`` to fill inside the ``with``; at its end the folder is moved to ``path``
    (which must not exist, or be an empty folder) in one step. On any error it is removed, and a kill leaves it as
    a partial folder (``.<name>.<random>.tmp``) that :func:`clean_partial` removes later."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    fd = os.open(tmp, os.O_RDONLY)
    try:
        _lock(fd)
        yield tmp
        if path.exists():
            path.rmdir()  # empty: the caller checked
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        os.close(fd)
    _fsync_dir(path.parent)


def _lock(fd: int) -> None:
    if fcntl is not None:
        fcntl.flock(fd, fcntl.LOCK_EX)


def _abandoned(path: Path) -> bool:
    """True when no live writer holds ``path`` (a partial file or folder): its lock can be taken, or, without
    locks, it is older than :data:`STALE_PARTIAL_S`."""
    if fcntl is None:
        return time.time() - path.lstat().st_mtime > STALE_PARTIAL_S
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def clean_partial(folder: str | os.PathLike, name: Optional[str] = None) -> list[Path]:
    """Remove the partial files and folders that killed writers (:func:`atomic_write`, :func:`atomic_folder`) left
    in ``folder`` (only those of the output ``name``, when given); those a live writer still holds stay. Returns
    what was removed."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for p in folder.glob(f".{name}.*.tmp" if name else PARTIAL_GLOB):
        if p.is_symlink() or not _abandoned(p):
            continue
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        removed.append(p)
    return removed


def clean_partial_outputs(out: str | os.PathLike) -> None:
    """Before writing ``out``: remove, and name, what earlier killed writes of it left beside it."""
    out = Path(out)
    for partial in clean_partial(out.parent, out.name):
        print(f"Removed {partial}: left by an interrupted write of {out.name}")


def reserve_numbered(folder: str | os.PathLike, template: str, pattern: str, start: int = 0,
                     attempts: int = 100_000) -> Path:
    """Create and return the first free ``folder/template.format(n)`` with ``n`` >= ``start`` and above every
    number already used in ``folder`` (files matching ``pattern``, whose group 1 is the number).

    The file is created with ``O_EXCL``: of two writers that race for a number, one gets it and the other moves
    on to the next, so a run never overwrites another's output. The caller fills the (empty) file in place with
    :func:`atomic_write` and removes it if it fails.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    used = [int(m.group(1)) for p in folder.iterdir() if (m := re.match(pattern, p.name))]
    n = max([start - 1, *used]) + 1
    for _ in range(attempts):
        path = folder / template.format(n)
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
        except FileExistsError:
            n += 1
            continue
        os.close(fd)
        return path
    raise OutputError(f"{folder}: no free file name after {attempts} tries")


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """True when ``a`` and ``b`` name the same file or folder (links and ``..`` resolved)."""
    a, b = Path(a), Path(b)
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
    except OSError:
        pass
    return a.resolve() == b.resolve()


def is_within(inner: str | os.PathLike, outer: str | os.PathLike) -> bool:
    """True when ``inner`` is ``outer`` or lies somewhere below it (after resolving links)."""
    inner, outer = Path(inner).resolve(), Path(outer).resolve()
    return inner == outer or outer in inner.parents


def check_output(out: str | os.PathLike, inputs: Iterable[str | os.PathLike], flag: str = "output",
                 overwrite: bool = False) -> Path:
    """Refuse an output path that is one of the inputs, or (without ``overwrite``) a file that exists already."""
    out = Path(out)
    for src in inputs:
        if same_file(out, src):
            raise OutputError(f"{flag} {out}: is also an input ({src}); write the result to a new file")
    if out.exists() and not overwrite:
        raise OutputError(f"{flag} {out}: exists already; choose a new name (or pass --overwrite)")
    clean_partial_outputs(out)
    return out
