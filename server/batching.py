"""Dynamic batching: many small concurrent requests become few ``predict`` calls.

One :class:`Batcher` serves one model version. It knows nothing about HTTP: ``submit`` takes
a request's items (the server's are raw texts; tests also use token-id lists) and returns their
probabilities, or raises a :class:`~server.errors.TextserveError` the transport maps to a
status. ``prepare`` turns one batch of items into the ``[batch, length]`` ids ``predict`` takes:
the server passes ``Tokenizer.encode_batch``, so a batch's texts are tokenized together, in one
compiled call (:mod:`server.native_tokenizer`: ~0.13 ms for 64 texts of 50 tokens right after a
``session.run``, against ~0.6 ms in numpy and more one by one in Python), on the inference
thread, and the event loop never tokenizes.

Scheduling policy (all times on the monotonic clock):

* **Idle model, lone request: no wait.** A request that arrives while nothing is in flight and
  nothing is queued is dispatched at once; ``max_wait_ms`` never delays it.
* **Busy model: accumulate.** Requests that arrive while a batch runs are queued. When the
  batch finishes, everything queued (up to ``max_batch_size`` texts) goes into the next
  ``predict``. If that batch would not be full, it is held until its oldest request has been
  queued ``max_wait_ms`` (requests that arrived during a long batch are already older than that,
  so in practice the hold only applies after very short batches, giving the clients just
  answered time to come back and join). ``max_wait_ms=0`` (the server's default) makes the
  batcher purely work-conserving: on closed-loop clients the hold, aimed at a full batch that
  fewer clients than ``max_batch_size`` can never fill, is mostly delay (measured side by
  side in ``docs/bench/README.md``).
* **At most ``max_in_flight`` predicts at once** (default 1; ``TEXTSERVE_MAX_IN_FLIGHT`` or
  models.yaml ``batching.max_in_flight``). With more than one, an extra predict starts only
  when its batch is full or its oldest request has waited ``max_wait_ms``. On 2 shared cores 2
  in flight measured +5-12 % texts/s but more CPU per single text and a worse single-text p99
  (``docs/bench/README.md``), so 1 stays the default.
* **A full batch is staged behind the running ones.** When ``max_in_flight`` predicts run and
  ``max_batch_size`` texts are queued, one more batch is formed and handed to a worker thread,
  which pads it and waits for a run slot (a semaphore of ``max_in_flight``): it starts the
  moment a running predict ends, with no round trip through the event loop in between, and
  TensorFlow still never runs more than ``max_in_flight`` of this model's predicts at once.
  Partial batches are never staged, so single-text traffic still merges into the largest
  batches it can (``stage_full_batches=False`` turns staging off).
* **Fair chunking.** Texts are taken from the queue in arrival order. A request with more texts
  than fit in the batch contributes a chunk and goes to the back of the queue, so a
  1000-text request is split into ``max_batch_size`` chunks that alternate with the small
  requests that arrive meanwhile (deficit round robin with a quantum of one batch): no batch is
  ever larger than ``max_batch_size`` and a small request waits for at most one chunk of each
  large request ahead of it.
* **Length grouping.** ``prepare`` pads each batch to its longest text. A request larger than
  one batch is chunked in order of item length (``len``: characters of a text, a good proxy for
  its tokens) and results are scattered back to the original order,
  so each chunk holds texts of similar length and pads little. Requests that fit in one batch are
  not reordered: sorting inside one batch cannot change its padded width, and reordering
  across requests would break arrival order. ``textserve bench`` measures the effect.
* **Bounded queue.** At most ``max_queue`` texts wait; beyond that ``submit`` raises
  :class:`~server.errors.Overloaded` at once (503 + Retry-After).
* **Dropped work.** A request whose ``submit`` is cancelled (client gone) leaves the queue;
  its chunks not yet started are never run, and results of chunks in flight are discarded. A
  request whose deadline passes before (the rest of) its work starts fails with
  :class:`~server.errors.DeadlineExceeded` and its remaining texts are dropped; once all of its
  chunks have started it is answered.
* **Idle split** (``idle_split``: 1 = off; the server resolves it from the CPUs and workers in
  :mod:`server.settings`). A batch dispatched to an idle model (nothing running, nothing
  queued: a lone request) is tokenized once, then run as up to ``idle_split`` concurrent
  predicts of row slices of at least :data:`MIN_SPLIT_ROWS` rows (the extra slices on
  ``split_executor``'s threads; to ``max_in_flight`` it is one predict). With one intra-op
  thread per session (and as many inter-op threads as slices) a lone request then uses the
  cores one thread per batch leaves idle, while batches that follow one another under load run
  whole, one core each, which costs less CPU per text than TensorFlow's own intra-op split
  (``docs/bench/README.md``).
* ``prepare`` and ``predict`` run together in the executor, off the event loop.
* ``close(timeout)`` refuses new work (:class:`~server.errors.ShuttingDown`), runs everything
  queued, and after ``timeout`` fails whatever is left with ``ShuttingDown``.

Everything but ``prepare``/``predict`` runs on the event loop thread; there are no locks.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence, Sized
from typing import Any, Generic, Protocol, TypeVar

import numpy as np
import numpy.typing as npt

from server.errors import BadRequest, DeadlineExceeded, Overloaded, PayloadTooLarge, ShuttingDown
from server.runtime.base import ProbArray
from server.text import IdArray

__all__ = ["BatchObserver", "Batcher"]

Item = TypeVar("Item", bound=Sized)

MIN_SPLIT_ROWS = 8
"""An idle split never makes a slice smaller than this many texts."""


class BatchObserver(Protocol):
    """Receives the batcher's measurements (implemented on prometheus-client by the metrics).

    Called on the event loop thread; implementations must be cheap and must not raise.
    """

    def batch_done(self, size: int, inference_s: float) -> None:
        """A predict finished: ``size`` texts in the batch, ``inference_s`` seconds in predict."""

    def queue_wait(self, seconds: float) -> None:
        """A request's first text started: seconds from ``submit`` to its batch's start."""

    def queue_depth(self, n: int) -> None:
        """Queued (not yet started) texts are now ``n``: published once per event-loop step
        in which the depth changed, with the depth at the end of that step."""


class _Request(Generic[Item]):
    """One ``submit`` call: its texts, where they stand, and the future its caller awaits."""

    __slots__ = (
        "answered",
        "deadline",
        "encoded",
        "enqueued",
        "future",
        "next",
        "order",
        "out",
        "queued",
        "started",
        "timer",
    )

    def __init__(
        self,
        encoded: Sequence[Item],
        order: npt.NDArray[np.intp] | None,
        future: asyncio.Future[ProbArray],
        enqueued: float,
        deadline: float | None,
    ) -> None:
        self.encoded = encoded
        self.order = order
        """Indices of ``encoded`` sorted by length (large requests only), else None."""
        self.future = future
        self.enqueued = enqueued
        self.deadline = deadline
        self.next = 0
        """Position (in ``order``) of the first text not yet handed to a batch."""
        self.answered = 0
        self.out: ProbArray | None = None
        self.queued = False
        self.started = False
        self.timer: asyncio.TimerHandle | None = None

    @property
    def remaining(self) -> int:
        return len(self.encoded) - self.next


class _Part:
    """Rows ``row:row+stop-start`` of a batch are positions ``start:stop`` of ``request``."""

    __slots__ = ("request", "row", "start", "stop")

    def __init__(self, request: _Request[Any], start: int, stop: int, row: int) -> None:
        self.request = request
        self.start = start
        self.stop = stop
        self.row = row


class Batcher(Generic[Item]):
    """Merges concurrent ``submit`` calls for one model version into batched ``predict`` calls."""

    def __init__(
        self,
        predict: Callable[[IdArray], ProbArray],
        prepare: Callable[[list[Item]], IdArray],
        *,
        max_batch_size: int,
        max_wait_ms: float,
        max_queue: int,
        executor: concurrent.futures.Executor,
        name: str = "",
        observer: BatchObserver | None = None,
        max_in_flight: int = 1,
        group_by_length: bool = True,
        stage_full_batches: bool = True,
        idle_split: int = 1,
        split_executor: concurrent.futures.Executor | None = None,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be >= 1")
        if max_wait_ms < 0:
            raise ValueError("max_wait_ms must be >= 0")
        if max_queue < 1:
            raise ValueError("max_queue must be >= 1")
        if max_in_flight < 1:
            raise ValueError("max_in_flight must be >= 1")
        if idle_split < 1:
            raise ValueError("idle_split must be >= 1")
        if idle_split > 1 and split_executor is None:
            raise ValueError("idle_split > 1 needs a split_executor")
        self._predict = predict
        self._prepare = prepare
        self._max_batch = max_batch_size
        self._max_wait = max_wait_ms / 1000.0
        self._max_queue = max_queue
        self._executor = executor
        self.name = name
        self._observer = observer
        self._max_in_flight = max_in_flight
        self._group_by_length = group_by_length
        self._stage_full = stage_full_batches
        self._idle_split = idle_split
        self._split_executor = split_executor
        self._run_slots = threading.BoundedSemaphore(max_in_flight)
        """Predicts running now; a staged batch's thread waits here (never the event loop)."""

        self._loop: asyncio.AbstractEventLoop | None = None
        self._queue: deque[_Request[Item]] = deque()
        self._live: set[_Request[Item]] = set()
        self._depth = 0
        self._depth_publish_due = False
        self._in_flight = 0
        self._fill_timer: asyncio.TimerHandle | None = None
        self._fill_due = 0.0
        self._closing = False
        self._drained: asyncio.Event | None = None

    # -- public interface ----------------------------------------------------------------------

    def start(self) -> None:
        """Bind to the running event loop. Call once, from a coroutine, before ``submit``."""
        self._loop = asyncio.get_running_loop()

    @property
    def queue_depth(self) -> int:
        """Texts queued and not yet handed to a ``predict``."""
        return self._depth

    @property
    def in_flight(self) -> int:
        """Predicts currently running in the executor."""
        return self._in_flight

    def _admit(self, n: int) -> None:
        """Raise, for capacity reasons, :class:`ShuttingDown` (closing), :class:`BadRequest`
        (no texts), :class:`PayloadTooLarge` (more than ``max_queue`` texts) or
        :class:`Overloaded` (the queue cannot take them): before any work is queued."""
        if self._closing:
            raise ShuttingDown(f"model {self.name} is shutting down")
        if n == 0:
            raise BadRequest("no texts to classify")
        if n > self._max_queue:
            raise PayloadTooLarge(
                f"{n} texts exceed the queue bound of model {self.name} ({self._max_queue} texts)"
            )
        if self._depth + n > self._max_queue:
            raise Overloaded(
                f"model {self.name} is overloaded: {self._depth} texts queued "
                f"(limit {self._max_queue})"
            )

    async def submit(self, encoded: Sequence[Item], *, deadline: float | None = None) -> ProbArray:
        """Probabilities ``[len(encoded), labels]`` for the items (texts), in order.

        ``deadline`` is a ``time.monotonic()`` instant; if (the rest of) the request has not
        started by then it fails with :class:`DeadlineExceeded`.
        """
        loop = self._loop
        if loop is None:
            raise RuntimeError(f"batcher {self.name!r}: start() was not called")
        n = len(encoded)
        self._admit(n)
        now = time.monotonic()
        if deadline is not None and now >= deadline:
            raise DeadlineExceeded("deadline passed before the request was queued")

        idle = self._in_flight == 0 and not self._queue
        order: npt.NDArray[np.intp] | None = None
        if self._group_by_length and n > self._max_batch:
            order = np.argsort(np.fromiter((len(e) for e in encoded), np.intp, n), kind="stable")
        req = _Request(encoded, order, loop.create_future(), now, deadline)
        self._live.add(req)
        self._push(req)
        self._depth += n
        self._depth_changed()
        if deadline is not None:
            req.timer = loop.call_at(loop.time() + (deadline - now), self._on_deadline, req)
        self._dispatch(force=idle)
        try:
            return await req.future
        except asyncio.CancelledError:
            self._abandon(req)
            raise
        finally:
            if req.timer is not None:
                req.timer.cancel()
            self._live.discard(req)

    async def close(self, timeout: float) -> None:  # noqa: ASYNC109 (the documented interface)
        """Refuse new work, finish queued and in-flight work; give up after ``timeout`` s."""
        self._closing = True
        if self._loop is None:
            return
        self._cancel_fill_timer()
        self._dispatch()
        if self._is_drained():
            return
        self._drained = asyncio.Event()
        try:
            await asyncio.wait_for(self._drained.wait(), timeout)
        except TimeoutError:
            self._fail_all(ShuttingDown(f"model {self.name} shut down before answering"))

    # -- scheduling ----------------------------------------------------------------------------

    def _push(self, req: _Request[Item]) -> None:
        self._queue.append(req)
        req.queued = True

    def _may_launch(self) -> bool:
        """Below ``max_in_flight``, or room to stage one full batch behind the running ones."""
        if self._in_flight < self._max_in_flight:
            return True
        return (
            self._stage_full
            and self._in_flight == self._max_in_flight
            and self._depth >= self._max_batch
        )

    def _dispatch(self, force: bool = False) -> None:
        """Start as many batches as the policy allows now; arm the fill timer otherwise."""
        while self._queue and self._may_launch():
            now = time.monotonic()
            if not force and not self._closing and self._depth < self._max_batch:
                due = self._queue[0].enqueued + self._max_wait
                if now < due:
                    self._arm_fill_timer(due)
                    return
            split = self._idle_split if force else 1
            force = False
            parts, texts = self._form_batch(now)
            if parts:
                self._launch(parts, texts, split)
        self._check_drained()

    def _form_batch(self, now: float) -> tuple[list[_Part], list[Item]]:
        parts: list[_Part] = []
        texts: list[Item] = []
        capacity = self._max_batch
        while capacity and self._queue:
            req = self._queue.popleft()
            req.queued = False
            if req.deadline is not None and now >= req.deadline:
                self._expire(req)
                continue
            take = min(req.remaining, capacity)
            start, stop = req.next, req.next + take
            if req.order is None:
                texts.extend(req.encoded[start:stop])
            else:
                texts.extend(req.encoded[int(i)] for i in req.order[start:stop])
            parts.append(_Part(req, start, stop, len(texts) - take))
            req.next = stop
            capacity -= take
            self._depth -= take
            if not req.started:
                req.started = True
                if self._observer is not None:
                    self._observer.queue_wait(now - req.enqueued)
            if req.remaining:
                self._push(req)  # back of the queue: its next chunk waits its turn
        self._depth_changed()
        return parts, texts

    def _launch(self, parts: list[_Part], texts: list[Item], split: int = 1) -> None:
        assert self._loop is not None
        self._in_flight += 1
        try:
            cfut = self._executor.submit(self._execute, texts, split)
        except RuntimeError as exc:  # executor shut down
            self._in_flight -= 1
            for part in parts:
                self._fail(part.request, exc)
            return
        afut = asyncio.wrap_future(cfut, loop=self._loop)
        afut.add_done_callback(functools.partial(self._on_batch_done, parts, len(texts)))

    def _execute(self, texts: list[Item], split: int = 1) -> tuple[ProbArray, float]:
        """Runs in the executor: prepare the ids (tokenize, pad to the longest text), wait for a
        run slot, predict (timed; in up to ``split`` concurrent slices)."""
        ids = self._prepare(texts)
        with self._run_slots:
            t0 = time.perf_counter()
            probs = self._predict_split(ids, split) if split > 1 else self._predict(ids)
            elapsed = time.perf_counter() - t0
        if probs.ndim != 2 or probs.shape[0] != len(texts):
            raise RuntimeError(
                f"model {self.name}: predict returned shape {probs.shape} for {len(texts)} texts"
            )
        return probs, elapsed

    def _predict_split(self, ids: IdArray, split: int) -> ProbArray:
        """``predict(ids)`` as up to ``split`` concurrent predicts of row slices: all but the
        first on the split executor, the first on this thread."""
        ways = min(split, len(ids) // MIN_SPLIT_ROWS)
        if ways < 2:
            return self._predict(ids)
        assert self._split_executor is not None
        slices = np.array_split(ids, ways)
        rest = [self._split_executor.submit(self._predict, part) for part in slices[1:]]
        try:
            first = self._predict(slices[0])
        finally:
            concurrent.futures.wait(rest)  # never leave a slice running unwaited
        return np.concatenate([first, *(f.result() for f in rest)])

    def _on_batch_done(
        self, parts: list[_Part], size: int, afut: asyncio.Future[tuple[ProbArray, float]]
    ) -> None:
        self._in_flight -= 1
        try:
            probs, elapsed = afut.result()
        except BaseException as exc:
            for part in parts:
                self._fail(part.request, exc)
        else:
            if self._observer is not None:
                self._observer.batch_done(size, elapsed)
            for part in parts:
                self._deliver(part, probs)
        self._dispatch()

    def _deliver(self, part: _Part, probs: ProbArray) -> None:
        req = part.request
        if req.future.done():  # cancelled, expired or failed meanwhile
            return
        count = part.stop - part.start
        rows = probs[part.row : part.row + count]
        total = len(req.encoded)
        if count == total:
            req.future.set_result(rows)
            return
        if req.out is None:
            req.out = np.empty((total, probs.shape[1]), dtype=probs.dtype)
        if req.order is None:
            req.out[part.start : part.stop] = rows
        else:
            req.out[req.order[part.start : part.stop]] = rows
        req.answered += count
        if req.answered == total:
            req.future.set_result(req.out)

    # -- dropping work ---------------------------------------------------------------------------

    def _unqueue(self, req: _Request[Item]) -> None:
        """Take ``req``'s texts that have not started out of the queue."""
        if req.queued:
            self._queue.remove(req)
            req.queued = False
        if req.remaining:
            self._depth -= req.remaining
            req.next = len(req.encoded)
            self._depth_changed()

    def _abandon(self, req: _Request[Item]) -> None:
        """The caller went away (its ``submit`` was cancelled)."""
        self._unqueue(req)
        self._check_drained()

    def _expire(self, req: _Request[Item]) -> None:
        self._unqueue(req)
        self._fail(req, DeadlineExceeded("deadline passed before the model could run the request"))

    def _on_deadline(self, req: _Request[Item]) -> None:
        req.timer = None
        if req.future.done() or not req.remaining:
            return  # answered, or all of its chunks already started: let them finish
        self._expire(req)
        self._check_drained()

    def _fail(self, req: _Request[Any], exc: BaseException) -> None:
        if not req.future.done():
            req.future.set_exception(exc)

    def _fail_all(self, exc: BaseException) -> None:
        for req in list(self._live):
            self._unqueue(req)
            self._fail(req, exc)
        self._queue.clear()

    # -- timers and bookkeeping ---------------------------------------------------------------

    def _arm_fill_timer(self, due: float) -> None:
        assert self._loop is not None
        if self._fill_timer is not None:
            if self._fill_due <= due:
                return
            self._fill_timer.cancel()
        self._fill_due = due
        delay = max(0.0, due - time.monotonic())
        self._fill_timer = self._loop.call_at(self._loop.time() + delay, self._on_fill_timer)

    def _on_fill_timer(self) -> None:
        self._fill_timer = None
        self._dispatch()

    def _cancel_fill_timer(self) -> None:
        if self._fill_timer is not None:
            self._fill_timer.cancel()
            self._fill_timer = None

    def _depth_changed(self) -> None:
        """Publish the queue depth once per event-loop step, however often it changed in it
        (a metric update is a lock + a file write in multiprocess mode)."""
        if self._observer is None or self._depth_publish_due:
            return
        if self._loop is None:
            self._observer.queue_depth(self._depth)
            return
        self._depth_publish_due = True
        self._loop.call_soon(self._publish_depth)

    def _publish_depth(self) -> None:
        self._depth_publish_due = False
        if self._observer is not None:
            self._observer.queue_depth(self._depth)

    def _is_drained(self) -> bool:
        return not self._queue and self._in_flight == 0

    def _check_drained(self) -> None:
        if self._drained is not None and self._closing and self._is_drained():
            self._drained.set()
