"""glibc malloc tuning for a long-running TensorFlow server: fewer pages kept after they are freed.

Two habits of glibc's allocator cost a model server resident memory it never uses again:

* the **dynamic mmap threshold**: a freed large block (say the 10 MiB a warm-up batch used)
  raises the threshold, so later blocks of that size come from the heap, and a heap block
  stays resident after ``free`` unless it sits at the very top. A fixed threshold keeps large
  blocks in their own mappings, which go back to the kernel on ``free``;
* **fragmented heaps**: Python objects freed in the middle of a heap (a vocabulary's
  temporaries, a graph's protos) keep their pages; ``malloc_trim(0)`` hands every whole free
  page back (``MADV_DONTNEED``), not only the top of the heap.

:func:`trim` runs after every model load and unload (setting ``malloc_trim``, on by default):
ten seed-scale models measured 2-4 MiB less RSS with it, at no cost per request. :func:`tune`
runs only with ``lean_tensorflow``: a fixed threshold turns every large block into a fresh
mapping, and the page faults cost ~3-4 % of throughput in the default mode (measured side by
side), for another ~2 MiB. Elsewhere than glibc (musl, macOS) both are no-ops.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import os
import sys

log = logging.getLogger(__name__)

M_MMAP_THRESHOLD = -3
"""``mallopt`` parameter number (glibc ``malloc.h``)."""

MMAP_THRESHOLD_BYTES = 128 * 1024
"""Blocks this large or larger get their own mapping (glibc's initial value, now fixed)."""


@functools.cache
def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
        libc.mallopt  # noqa: B018 - glibc only
        libc.malloc_trim  # noqa: B018
    except (OSError, AttributeError):
        return None
    return libc


def tune() -> bool:
    """Fix glibc's mmap threshold (see the module docstring). True if it was applied."""
    libc = _libc()
    if libc is None:
        return False
    ok = bool(libc.mallopt(ctypes.c_int(M_MMAP_THRESHOLD), ctypes.c_int(MMAP_THRESHOLD_BYTES)))
    if not ok:
        log.warning("mallopt(M_MMAP_THRESHOLD) refused; glibc keeps its dynamic threshold")
    return ok


def trim() -> bool:
    """Give free heap pages back to the kernel. True if glibc released any memory."""
    libc = _libc()
    return bool(libc.malloc_trim(ctypes.c_size_t(0))) if libc is not None else False


SYSTEM_ALLOCATOR_ENV = "TF_ONEDNN_USE_SYSTEM_ALLOCATOR"
"""TensorFlow's switch: oneDNN ops' large tensors from ``malloc`` instead of a caching pool."""


def lean_tensorflow() -> bool:
    """Make TensorFlow allocate large tensors with ``malloc`` instead of its caching pool, and
    fix glibc's mmap threshold (:func:`tune`).

    With oneDNN (TensorFlow's default on x86), activations and gathered rows come from a
    BFC pool that keeps its peak for the life of the process; with the system allocator and
    the fixed mmap threshold they go back to the kernel after each batch. Measured
    with ten seed-scale models (docs/memory/README.md): about 17 MiB less RSS at rest, but
    about 30 % slower batch-64 runs (page faults on every fresh mapping). The allocator switch
    must come before TensorFlow is imported: returns False (and sets only the threshold) if it
    already was.
    """
    tune()
    if "tensorflow" in sys.modules:
        log.warning("%s not set: TensorFlow is already imported", SYSTEM_ALLOCATOR_ENV)
        return False
    os.environ[SYSTEM_ALLOCATOR_ENV] = "1"
    return True
