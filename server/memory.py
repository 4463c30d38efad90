"""Process memory figures (psutil). The memory monitor builds on these.

RSS counts every resident page the process maps, shared ones included; USS counts the pages
only this process holds (what killing it would free); PSS splits shared pages between the
processes that map them.
"""

from __future__ import annotations

from dataclasses import dataclass

import psutil


@dataclass(frozen=True)
class ProcessMemory:
    rss: int
    uss: int
    pss: int


def process_memory(process: psutil.Process | None = None) -> ProcessMemory:
    """RSS, USS and PSS of ``process`` (default: this process), in bytes."""
    proc = process or psutil.Process()
    info = proc.memory_full_info()
    return ProcessMemory(rss=int(info.rss), uss=int(info.uss), pss=int(getattr(info, "pss", 0)))
