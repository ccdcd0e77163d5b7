"""Atomic file and directory output: nothing half-written is ever left at the destination."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path


def atomic_write_text(path: str | Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


#: how a work folder of a build into ``OUT`` is named (beside it): ``.OUT.edgeopt-XXXXXXXX``
_WORK = ".{name}.edgeopt-"
#: a work folder without its lock file is left alone this long (its creator may be between mkdir and lock)
_UNLOCKED_GRACE_S = 600.0
_TEMPDIR_LOCK = threading.Lock()
_TEMPDIR_DEPTH = 0
_TEMPDIR_SAVED: str | None = None


def _remove(path: Path) -> None:
    """Remove a file, a symlink (not what it points at) or a directory tree; missing is fine."""
    with contextlib.suppress(FileNotFoundError):
        if path.is_symlink() or not path.is_dir():
            path.unlink()
        else:
            shutil.rmtree(path)


@contextlib.contextmanager
def _flock(path: Path) -> Iterator[None]:
    """Hold an exclusive advisory lock on ``path`` (a directory: its own fd) for the block (no-op without fcntl)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: no advisory locks, one build at a time is the user's job
        yield
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _try_lock(path: Path) -> int | None:
    """An fd holding an exclusive lock on ``path``, or None when another live process holds it."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover
        return None
    try:
        fd = os.open(path, os.O_RDWR)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def recover(dest: str | Path) -> list[str]:
    """Tidy what crashed earlier writes into ``dest`` left beside it; call with the parent's lock held.

    * a work folder (``.DEST.edgeopt-*``) whose owner is gone (its lock is free) is removed;
    * ``.DEST.old`` alone (a crash between the two renames of the swap) becomes ``DEST`` again: the previous
      result is restored; beside an existing ``DEST`` (a crash before it was removed) it is removed, whatever
      it is (folder, file or symlink).

    Returns:
        What was done, one line each (empty when there was nothing to do).
    """
    dest = Path(dest)
    done = [f"removed {name}, left by an interrupted build"
            for name in sweep_dead(dest.parent, _WORK.format(name=dest.name))]
    old = dest.with_name(f".{dest.name}.old")
    if os.path.lexists(old):
        if not os.path.lexists(dest) and old.is_dir() and not old.is_symlink():
            os.replace(old, dest)
            done.append(f"restored {dest.name} from {old.name}, left by a build interrupted while replacing it")
        else:
            _remove(old)
            done.append(f"removed {old.name}, left by an interrupted build")
    return done


def sweep_dead(folder: Path, prefix: str) -> list[str]:
    """Remove the work folders ``folder/<prefix>*`` whose owner died (their ``lock`` file is not locked; one without
    a lock file after a grace period); returns their names.  Live ones (locked by a running process) stay."""
    import glob

    removed = []
    for work in sorted(Path(folder).glob(f"{glob.escape(prefix)}*")):
        if work.is_symlink() or not work.is_dir():
            continue
        lock = work / "lock"
        if lock.exists():
            fd = _try_lock(lock)
            if fd is None:
                continue  # its owner is alive
            try:
                shutil.rmtree(work, ignore_errors=True)
            finally:
                os.close(fd)
        else:
            try:
                age = time.time() - work.stat().st_mtime
            except OSError:
                continue
            if age < _UNLOCKED_GRACE_S:
                continue
            shutil.rmtree(work, ignore_errors=True)
        removed.append(work.name)
    return removed


def locked_workdir(prefix: str, parent: Path | str | None = None) -> tuple[Path, int | None]:
    """A fresh folder ``parent/<prefix>XXXXXXXX`` holding a ``lock`` file this process keeps locked (the returned fd:
    close it after removing the folder), so :func:`sweep_dead` knows it is alive."""
    work = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    # locked before it gets its name: a work folder with a "lock" whose lock is free is a dead process's
    pending = work / "lock.new"
    pending.write_text(f"{os.getpid()}\n")
    fd = _try_lock(pending)
    os.replace(pending, work / "lock")
    return work, fd


@contextlib.contextmanager
def run_scratch() -> Iterator[Path]:
    """Temporary files of one edgeopt run in ``<system temp>/edgeopt-run-XXXXXXXX/`` (every :mod:`tempfile` user in
    the process, third-party quantizers included, for the block); folders of runs that were killed are removed
    first, so a crash never leaves temp files behind for long.  Nested builds keep this folder."""
    base = Path(tempfile.gettempdir())
    sweep_dead(base, "edgeopt-run-")
    work, fd = locked_workdir("edgeopt-run-", base)
    try:
        tmp = work / "tmp"
        tmp.mkdir()
        with _scratch_tempdir(tmp):
            yield tmp
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if fd is not None:
            os.close(fd)


@contextlib.contextmanager
def _scratch_tempdir(folder: Path) -> Iterator[None]:
    """Point :mod:`tempfile` (ours and third-party quantizers' temporary files) at ``folder`` for the block; the
    outermost caller wins (nested builds of a fleet share the fleet's), and the old setting comes back after."""
    global _TEMPDIR_DEPTH, _TEMPDIR_SAVED
    with _TEMPDIR_LOCK:
        if _TEMPDIR_DEPTH == 0:
            _TEMPDIR_SAVED = tempfile.tempdir
            tempfile.tempdir = str(folder)
        _TEMPDIR_DEPTH += 1
    try:
        yield
    finally:
        with _TEMPDIR_LOCK:
            _TEMPDIR_DEPTH -= 1
            if _TEMPDIR_DEPTH == 0:
                tempfile.tempdir = _TEMPDIR_SAVED


@contextlib.contextmanager
def atomic_dir(dest: str | Path, *, overwrite: bool = True) -> Iterator[Path]:
    """Yield a fresh directory to fill; on success it replaces ``dest``, on error it is removed.

    The directory lives in a work folder beside ``dest`` (``.DEST.edgeopt-XXXXXXXX/out``), with the build's
    temporary files (``tmp/``: :mod:`tempfile` points there for the block, so a killed build leaves nothing in
    the system's temp folder) and a lock file held while the build lives.  The next write into ``dest`` removes
    work folders whose builds died (:func:`recover`).  Replacing ``dest`` (two renames through ``.DEST.old``)
    happens under an exclusive lock on the parent folder, so concurrent builds into one ``dest`` each land whole,
    one after the other; a crash between the renames is undone by the next write.

    Raises:
        FileExistsError: ``dest`` exists and ``overwrite`` is False.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with _flock(dest.parent):
        recover(dest)
    work, lock_fd = locked_workdir(_WORK.format(name=dest.name), dest.parent)
    try:
        out, tmp = work / "out", work / "tmp"
        out.mkdir()
        tmp.mkdir()
        with _scratch_tempdir(tmp):
            yield out
        with _flock(dest.parent):
            recover(dest)
            if os.path.lexists(dest):
                if not overwrite:
                    raise FileExistsError(dest)
                old = dest.with_name(f".{dest.name}.old")
                os.replace(dest, old)
                os.replace(out, dest)
                _remove(old)
            else:
                os.replace(out, dest)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if lock_fd is not None:
            os.close(lock_fd)


def atomic_write_model(model, path: str | Path) -> None:
    """Save an ONNX model so the destination is either the old file or the complete new one.

    Models over ~1.8 GB are written with their weights in ``<name>.data`` beside them.
    """
    import onnx

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    big = model.ByteSize() > 1_800_000_000
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{path.name}.") as d:
        tmp = Path(d) / path.name
        if big:
            onnx.save(model, str(tmp), save_as_external_data=True, location=f"{path.name}.data")
            os.replace(Path(d) / f"{path.name}.data", path.parent / f"{path.name}.data")
        else:
            onnx.save(model, str(tmp))
        os.replace(tmp, path)


def read_small_file(path: Path, limit: int, error: type[Exception], what: str, hint: str) -> bytes:
    """The bytes of a small configuration file, read with every check: a regular file (a FIFO must not block the
    open), at most ``limit`` bytes.  Each failure is one ``error(...)`` line naming ``what`` and ``path``; ``hint``
    ends the too-large message (what such a file normally is)."""
    import stat

    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        if not stat.S_ISREG(os.fstat(fd).st_mode):  # before fdopen, which refuses a directory with its own error
            os.close(fd)
            raise error(f"{what} {path} is not a regular file")
        with os.fdopen(fd, "rb") as f:
            raw = f.read(limit + 1)
    except OSError as e:
        raise error(f"cannot read {what} {path}: {e.strerror or e}") from e
    if len(raw) > limit:
        raise error(f"{what} {path} is larger than {limit >> 20} MiB; {hint}")
    return raw
