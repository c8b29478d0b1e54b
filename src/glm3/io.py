"""Atomic artifact writing: readers never see a half-written file or directory."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _public_mode(path: str, directory: bool = False) -> None:
    """mkstemp/mkdtemp create 0600/0700 entries; give artifacts the usual umask-based permissions."""
    os.chmod(path, (0o777 if directory else 0o666) & ~_umask())


def public_permissions(path: str | os.PathLike) -> None:
    """Give a file or directory the usual umask-based permissions (some writers, e.g. MindSpore's export,
    make theirs 0400/0700)."""
    path = os.fspath(path)
    _public_mode(path, directory=os.path.isdir(path))


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    try:
        _public_mode(tmp)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary path beside `path`; it is renamed onto `path` only if the block succeeds."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    os.close(fd)
    _public_mode(tmp)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(parent: str, base: str) -> list[str]:
    """Remove `.{base}.{pid}.*.tmp` directories left by writers that were killed (their pid is gone).

    A stale `.old` (the previous version moved aside) is removed only once `base` itself exists again.
    """
    removed = []
    prefix = f".{base}."
    suffixes = (".tmp", ".old") if os.path.exists(os.path.join(parent, base)) else (".tmp",)
    for entry in os.listdir(parent):
        if not (entry.startswith(prefix) and entry.endswith(suffixes)):
            continue
        pid = entry[len(prefix) :].split(".", 1)[0]
        if pid.isdigit() and not _pid_alive(int(pid)):
            shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)
            removed.append(entry)
    return removed


def tail_lines(path: str | os.PathLike, lines: int) -> str:
    """The last `lines` lines of a text file (a log), or "" if it cannot be read."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError:
        return ""


@contextlib.contextmanager
def exclusive_lock(path: str | os.PathLike, what: str, wait: bool = False) -> Iterator[None]:
    """Hold an exclusive lock on the file `path` (created if needed); if another process holds it, fail at
    once, or with wait=True wait until it is released.

    The kernel drops the lock when its holder exits, however it exits; no stale lock files to clean up.
    """
    import fcntl

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise FileExistsError(f"{what} is in use by another process (lock {path})") from None
        yield


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike, overwrite: bool = False) -> Iterator[str]:
    """Yield a temporary directory beside `path`, renamed onto `path` only if the block succeeds.

    With overwrite=True an existing `path` is replaced (see publish_directory). Temporary
    directories carry the writer's pid; ones left by a killed writer are removed on the next attempt.
    """
    path = os.path.abspath(os.fspath(path))
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"{path} already exists (pass overwrite=True / --overwrite to replace it)")
    base = os.path.basename(path)
    remove_stale_temporaries(parent, base)
    tmp = tempfile.mkdtemp(prefix=f".{base}.{os.getpid()}.", suffix=".tmp", dir=parent)
    _public_mode(tmp, directory=True)
    try:
        yield tmp
        publish_directory(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def publish_directory(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Rename the finished directory `src` onto `dst` (same filesystem), replacing an existing `dst`.

    The old `dst` is moved aside first and removed after the rename, so a crash in between leaves either
    the old or the new directory, never a mix.
    """
    dst = os.path.abspath(os.fspath(dst))
    parent, base = os.path.dirname(dst), os.path.basename(dst)
    os.makedirs(parent, exist_ok=True)
    old = None
    if os.path.exists(dst):
        old = tempfile.mkdtemp(prefix=f".{base}.{os.getpid()}.", suffix=".old", dir=parent)
        os.rmdir(old)
        os.replace(dst, old)
    os.replace(src, dst)
    if old:
        shutil.rmtree(old, ignore_errors=True)


def check_destination(
    dst: str | os.PathLike, needed_bytes: int, overwrite: bool = False, src: str | os.PathLike | None = None
) -> None:
    """Fail before any work when `dst` cannot be written: it exists (and overwrite is off), it lies in
    the source, a parent is not a directory, the parent is not writable (probed, so it also holds for
    root and read-only file systems), or the disk lacks `needed_bytes`."""
    dst_abs = os.path.abspath(os.fspath(dst))
    if src is not None:
        src_abs = os.path.abspath(os.fspath(src))
        if dst_abs == src_abs or dst_abs.startswith(src_abs.rstrip(os.sep) + os.sep):
            raise ValueError(f"destination {dst} must not be the source or lie inside it")
    if os.path.exists(dst_abs) and not overwrite:
        raise FileExistsError(f"{dst} already exists (pass --overwrite to replace it)")
    parent = os.path.dirname(dst_abs)
    while not os.path.isdir(parent):
        if os.path.exists(parent):
            raise NotADirectoryError(f"cannot create {dst}: {parent} is not a directory")
        parent = os.path.dirname(parent)
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".glm3-write-probe.", dir=parent))
    except OSError as exc:
        raise PermissionError(f"cannot write into {parent} (destination {dst}): {exc.strerror or exc}") from exc
    free = shutil.disk_usage(parent).free
    if free < needed_bytes + (64 << 20):
        raise OSError(
            f"not enough disk space for {dst}: needs about {needed_bytes / 1e9:.2f} GB, "
            f"{free / 1e9:.2f} GB free in {parent}"
        )


def byte_progress(total: int, desc: str, enabled: bool, mininterval: float = 0.1):
    """A progress bar over `total` bytes on stderr (tqdm; binary units), shown only when `enabled`."""
    import sys

    from tqdm import tqdm

    return tqdm(
        total=total,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        desc=desc,
        disable=not enabled,
        file=sys.stderr,
        mininterval=mininterval,
    )
