"""Silencing chatty libraries (onnxruntime's quantizer prints to stdout) per thread.

``contextlib.redirect_stdout`` swaps the process-wide ``sys.stdout``: two threads of a fleet doing it at once can
leave the main thread writing into a discarded buffer (the CLI's own output then vanishes).  :func:`quiet_stdout`
installs, once, a proxy that drops writes from threads inside the context and passes the others through.
"""

from __future__ import annotations

import contextlib
import sys
import threading
from collections.abc import Iterator

_local = threading.local()
_install = threading.Lock()


class _ThreadMutedStream:
    """Forwards to the wrapped stream unless the writing thread is muted."""

    def __init__(self, stream) -> None:
        self._stream = stream

    def write(self, s: str) -> int:
        if getattr(_local, "depth", 0):
            return len(s)
        return self._stream.write(s)

    def flush(self) -> None:
        if not getattr(_local, "depth", 0):
            self._stream.flush()

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


@contextlib.contextmanager
def _muted(stream: str) -> Iterator[None]:
    """Mute this thread's writes to ``sys.<stream>`` inside the block (the proxy is installed once, then stays)."""
    with _install:
        if not isinstance(getattr(sys, stream), _ThreadMutedStream):
            setattr(sys, stream, _ThreadMutedStream(getattr(sys, stream)))
    _local.depth = getattr(_local, "depth", 0) + 1
    try:
        yield
    finally:
        _local.depth -= 1


def quiet_stdout():
    """Drop what this thread prints to stdout inside the block; other threads print as usual."""
    return _muted("stdout")


def quiet_stderr():
    """Drop what this thread writes to Python's stderr inside the block (warnings libraries print on import)."""
    return _muted("stderr")


def import_quietly(name: str):
    """Import a chatty module (coremltools prints version and missing-library notices on import) with this thread's
    stdout and stderr muted; later imports are cached and silent anyway."""
    import importlib

    with quiet_stdout(), quiet_stderr():
        return importlib.import_module(name)


_native = threading.Lock()


@contextlib.contextmanager
def quiet_native_stderr() -> Iterator[None]:
    """Send what native code writes to file descriptor 2 inside the block to /dev/null (LiteRT's one-time
    "Created TensorFlow Lite XNNPACK delegate" INFO line).  Process-wide while it lasts, so keep the block short;
    one block at a time."""
    import os

    with _native:
        sys.stderr.flush()
        saved = os.dup(2)
        null = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(null, 2)
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            os.close(null)
