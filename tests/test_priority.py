"""TensorFlow's threads run below the event loop's priority (:mod:`server.priority`).

Unit checks of :func:`lower_this_thread` on real threads, and a real ``textserve serve``
process whose threads are read from outside after it classified texts: the threads that did
the work besides the event loop, and every thread TensorFlow started, carry the higher nice
value; the event loop (the main thread) keeps the process's own.
"""

from __future__ import annotations

import os
import sys
import threading
from pathlib import Path

import httpx
import pytest

from server.priority import MAX_NICE, lower_this_thread
from server.settings import AUTO_NICE, Settings
from tests.serve_process import repo_with, serving

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="per-thread nice values are Linux's"
)


def nice_of(tid: int) -> int:
    return os.getpriority(os.PRIO_PROCESS, tid)


def in_thread(increment: int) -> tuple[int | None, int]:
    """(what lower_this_thread returned, the thread's nice value after it), in a new thread."""
    out: list[tuple[int | None, int]] = []

    def run() -> None:
        got = lower_this_thread(increment)
        out.append((got, nice_of(threading.get_native_id())))

    t = threading.Thread(target=run)
    t.start()
    t.join()
    return out[0]


def test_lower_this_thread_adds_to_the_calling_threads_nice_value_only() -> None:
    base = nice_of(threading.get_native_id())
    expected = min(MAX_NICE, base + 5)
    assert in_thread(5) == (expected, expected)
    assert nice_of(threading.get_native_id()) == base  # the caller's thread only


def test_zero_is_off_and_the_value_is_capped() -> None:
    base = nice_of(threading.get_native_id())
    assert in_thread(0) == (None, base)
    assert in_thread(40) == (MAX_NICE, MAX_NICE)


@pytest.mark.parametrize(
    ("settings", "nice"),
    [
        ({"workers": 2}, 10),  # one thread per batch: TensorFlow below the event loop
        ({"intra_op_threads": 1}, 10),
        ({}, 0),  # one process on 2 CPUs: 2 intra-op threads that wait for each other
        ({"intra_op_threads": 0}, 0),  # TensorFlow's own (multi-thread) pools
        ({"workers": 2, "inference_nice": 3}, 3),  # set: as set
        ({"inference_nice": 5}, 5),
    ],
)
def test_the_unset_increment_follows_the_thread_layout(
    monkeypatch: pytest.MonkeyPatch, settings: dict[str, int], nice: int
) -> None:
    import server.settings

    monkeypatch.setattr(server.settings, "available_cpus", lambda: 2)
    assert Settings(_env_file=None, **settings).thread_layout().inference_nice == nice  # type: ignore[arg-type]


def test_tensorflow_threads_of_a_real_server_run_below_the_event_loop(
    small_repo: Path, tmp_path: Path
) -> None:
    repo = repo_with(small_repo, tmp_path / "repo", ["pos"])
    one_thread = {"TEXTSERVE_INTRA_OP_THREADS": "1"}  # one thread per batch: nice +10
    with serving(repo, log=tmp_path / "serve.log", env=one_thread) as served:
        with httpx.Client(base_url=served.url, timeout=30) as client:
            for i in range(100):
                texts = [f"text {i} {j} about a small brown dog" for j in range(16)]
                r = client.post("/v1/models/pos:classify", json={"texts": texts})
                assert r.status_code == 200
        process = served.process
        base = nice_of(process.pid)  # the main thread runs the event loop
        lowered = min(MAX_NICE, base + AUTO_NICE)
        threads = {t.id: t.user_time + t.system_time for t in process.threads()}
        names = {
            tid: Path(f"/proc/{process.pid}/task/{tid}/comm").read_text().strip() for tid in threads
        }
        tensorflow = [tid for tid, name in names.items() if name.startswith("tf_")]
        assert tensorflow, names  # TensorFlow names its pool threads tf_*
        assert {nice_of(tid) for tid in tensorflow} == {lowered}
        busiest = max((tid for tid in threads if tid != process.pid), key=threads.__getitem__)
        assert threads[busiest] > 0
        assert nice_of(busiest) == lowered, (names[busiest], threads)
        assert base != lowered
