"""glibc malloc tuning (server/allocator.py) on this Linux machine, and the lean TF switch."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from server import allocator
from server.memory import process_memory

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")


def test_trim_gives_fragmented_heap_pages_back() -> None:
    """Many small blocks freed in the middle of the heap stay resident until trimmed."""
    assert allocator.tune()
    keep: list[np.ndarray] = []
    drop: list[np.ndarray] = []
    for i in range(6_000):  # ~94 MiB of 16 KiB heap blocks, one in eight kept
        (keep if i % 8 == 0 else drop).append(np.empty(16 * 1024, dtype=np.uint8))
    for block in drop:
        block.fill(1)
    for block in keep:
        block.fill(1)
    del drop
    before = process_memory().rss
    assert allocator.trim()
    after = process_memory().rss
    del keep
    assert before - after > 40 * 2**20, (before, after)


def test_lean_tensorflow_sets_the_switch_only_before_tensorflow_is_imported() -> None:
    code = (
        "import os, sys\n"
        "from server import allocator\n"
        "assert allocator.lean_tensorflow()\n"
        "assert os.environ['TF_ONEDNN_USE_SYSTEM_ALLOCATOR'] == '1'\n"
        "import tensorflow\n"
        "os.environ.pop('TF_ONEDNN_USE_SYSTEM_ALLOCATOR')\n"
        "assert not allocator.lean_tensorflow()\n"
        "assert 'TF_ONEDNN_USE_SYSTEM_ALLOCATOR' not in os.environ\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr[-2000:]
