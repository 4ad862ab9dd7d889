"""The host's free memory, checked before large allocations."""

from __future__ import annotations

import os

from hexjax.errors import PlanError
from hexjax.models.config import format_bytes


def available_host_bytes() -> int | None:
    """Memory the host can still give (``MemAvailable``), or None where it cannot be read."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def require_host_bytes(nbytes: float, what: str, fix: str) -> None:
    """Refuse, with the figures, to allocate ``nbytes`` of host memory that is not there."""
    have = available_host_bytes()
    if have is not None and nbytes > have:
        raise PlanError(f"{what} needs {format_bytes(nbytes)} of host memory but {format_bytes(have)} is "
                        f"available; {fix}")
