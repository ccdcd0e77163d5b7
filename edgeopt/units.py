"""Human-readable quantities shared by messages, tables and reports."""

from __future__ import annotations


def fmt_bytes(n: float) -> str:
    """``512`` -> ``512 B``, ``3072`` -> ``3.0 KiB``, binary units up to GiB."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"
