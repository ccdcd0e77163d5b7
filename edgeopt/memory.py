"""The one memory limit: how much model loading, analysis and data reading may take (``--max-memory``,
``$EDGEOPT_MAX_MEMORY``, else half the available memory, at most 8 GiB)."""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

from .errors import EdgeoptError

#: The environment variable that sets :func:`max_memory` (bytes, or a size like ``4GiB``); ``--max-memory`` wins.
MAX_MEMORY_ENV = "EDGEOPT_MAX_MEMORY"
#: The default ceiling of :func:`max_memory` when the machine's free memory is larger.
DEFAULT_MAX_MEMORY = 8 << 30
_max_memory_override: int | None = None


class MemoryLimitError(EdgeoptError):
    """Work that would need more memory than the limit (``--max-memory``, ``$EDGEOPT_MAX_MEMORY``)."""


def parse_size(text: str, what: str = "--max-memory") -> int:
    """``"4GiB"`` -> 4294967296, ``"512MB"``, ``"4G"`` (decimal), ``"1000000"``; one-line :class:`EdgeoptError` else."""
    from pydantic import ByteSize, TypeAdapter, ValidationError

    try:
        n = int(TypeAdapter(ByteSize).validate_python(str(text).strip()))
    except (ValidationError, ValueError, OverflowError):
        n = 0
    if n <= 0:
        raise EdgeoptError(f"{what} {str(text)[:40]!r} is not a size; give bytes or a size like 4GiB or 512MB")
    return n


def available_memory() -> int | None:
    """Memory this process may still take: the kernel's MemAvailable, less where a cgroup (container) limit is lower."""
    avail: int | None = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
                    break
    except (OSError, ValueError, IndexError):
        pass
    if avail is None:
        try:
            avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (AttributeError, OSError, ValueError):
            avail = None
    try:  # cgroup v2: memory.max ("max" when unlimited) less memory.current
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit.isdigit():
            left = int(limit) - int(Path("/sys/fs/cgroup/memory.current").read_text().strip())
            avail = max(0, left) if avail is None else min(avail, max(0, left))
    except (OSError, ValueError):
        pass
    return avail


def set_max_memory(n: int | None) -> None:
    """Set the memory limit (``None``: back to ``$EDGEOPT_MAX_MEMORY`` or the default); ``--max-memory`` calls it."""
    global _max_memory_override
    if n is not None and n <= 0:
        raise EdgeoptError(f"the memory limit must be positive, not {n}")
    _max_memory_override = n


@contextmanager
def memory_limit(n: int | None):
    """:func:`set_max_memory` for a block (``None`` leaves the limit as it is)."""
    global _max_memory_override
    before = _max_memory_override
    if n is not None:
        set_max_memory(n)
    try:
        yield
    finally:
        _max_memory_override = before


def max_memory() -> int:
    """The most memory model loading and analysis may use: :func:`set_max_memory` / ``--max-memory`` if set, else
    ``$EDGEOPT_MAX_MEMORY``, else half the available memory, at most 8 GiB."""
    if _max_memory_override is not None:
        return _max_memory_override
    env = os.environ.get(MAX_MEMORY_ENV)
    if env:
        return parse_size(env, f"${MAX_MEMORY_ENV}")
    avail = available_memory()
    return max(1 << 28, min(avail // 2, DEFAULT_MAX_MEMORY)) if avail else DEFAULT_MAX_MEMORY


def limit_hint() -> str:
    return f"raise the limit with --max-memory or ${MAX_MEMORY_ENV} if the machine has the memory"
