"""A lower scheduling priority (a higher nice value) for the threads that run TensorFlow.

Why: on a small machine the event loop (parsing requests, sending answers) and TensorFlow's
threads want the same cores. When a batch is running and an answer is ready to go, the answer
should go first: it takes microseconds, and the client's next request joins the next batch
sooner. With equal priority the kernel may leave the event loop waiting for a time slice of
milliseconds. Measured side by side in docs/bench/README.md.

On Linux the nice value belongs to each thread (``setpriority(PRIO_PROCESS, tid)``) and a new
thread inherits its creator's. :func:`lower_this_thread` runs as the initializer of the
registry's loader, inference and split threads; TensorFlow's own thread pools are created by
the first session, on the loader thread, and inherit its value. Raising a nice value needs no
privilege. Elsewhere it does nothing.
"""

from __future__ import annotations

import logging
import os
import sys
import threading

log = logging.getLogger("textserve.priority")

MAX_NICE = 19


def lower_this_thread(increment: int) -> int | None:
    """Add ``increment`` to the calling thread's nice value (at most 19). The new value, or
    None where per-thread priorities are not available or the increment is 0."""
    if increment <= 0 or not sys.platform.startswith("linux"):
        return None
    tid = threading.get_native_id()
    try:
        target = min(MAX_NICE, os.getpriority(os.PRIO_PROCESS, tid) + increment)
        os.setpriority(os.PRIO_PROCESS, tid, target)
    except OSError as exc:  # e.g. a seccomp profile that forbids it: run at equal priority
        log.warning("could not lower the priority of thread %d: %s", tid, exc)
        return None
    return target
