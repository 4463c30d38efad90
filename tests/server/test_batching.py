"""The dynamic batcher: merging, ordering, fairness, bounds, cancellation, deadlines, drain.

Correctness runs a real TensorFlow CNN (``server.graph.build_cnn``, random weights). The
scheduling tests use a plain numpy classifier whose every row depends only on that row's ids,
behind a gate (a ``threading.Event``) that holds the "model" busy while the test arranges the
queue; both are real functions running in a real thread pool.
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import numpy as np
import pytest

from server.artifact import PAD_ID, CnnSpec, TokenizerSpec
from server.batching import Batcher
from server.errors import (
    BadRequest,
    DeadlineExceeded,
    Overloaded,
    PayloadTooLarge,
    ShuttingDown,
)
from server.runtime.base import ProbArray
from server.text import IdArray, Tokenizer, Vocabulary

T = TypeVar("T")
VOCAB = 60
TOKENIZER = Tokenizer(
    Vocabulary.from_words([f"w{i}" for i in range(VOCAB - 2)]), TokenizerSpec(max_len=40)
)


def run(coro_fn: Callable[[], Awaitable[T]]) -> T:
    async def main() -> T:
        return await coro_fn()

    return asyncio.run(main())


def row_probs(ids: IdArray) -> ProbArray:
    """A real, padding-invariant classifier: each row's output depends only on its own ids."""
    real = ids != PAD_ID
    lengths = real.sum(axis=1).astype(np.float64)
    total = np.where(real, ids, 0).sum(axis=1).astype(np.float64)
    logits = np.stack([total % 7.0, lengths / 3.0, np.sqrt(total)], axis=1)
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs: ProbArray = (e / e.sum(axis=1, keepdims=True)).astype(np.float32)
    return probs


class GatedModel:
    """``row_probs`` that records every batch and blocks while ``gate`` is clear."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.gate.set()
        self.batches: list[IdArray] = []
        self.started = threading.Event()
        self.fail_next: Exception | None = None

    def predict(self, ids: IdArray) -> ProbArray:
        self.batches.append(ids.copy())
        self.started.set()
        if not self.gate.wait(timeout=30):
            raise TimeoutError("test gate never opened")
        if self.fail_next is not None:
            exc, self.fail_next = self.fail_next, None
            raise exc
        return row_probs(ids)

    def seen_ids(self) -> set[int]:
        return {int(i) for b in self.batches for i in b.ravel() if i != PAD_ID}


class RecordingObserver:
    def __init__(self) -> None:
        self.sizes: list[int] = []
        self.inference: list[float] = []
        self.waits: list[float] = []
        self.depths: list[int] = []

    def batch_done(self, size: int, inference_s: float) -> None:
        self.sizes.append(size)
        self.inference.append(inference_s)

    def queue_wait(self, seconds: float) -> None:
        self.waits.append(seconds)

    def queue_depth(self, n: int) -> None:
        self.depths.append(n)


@pytest.fixture
def pool() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(max_workers=2) as ex:
        yield ex


def make(
    predict: Callable[[IdArray], ProbArray],
    pool: ThreadPoolExecutor,
    observer: RecordingObserver | None = None,
    **kw: Any,
) -> Batcher[list[int]]:
    opts: dict[str, Any] = {"max_batch_size": 8, "max_wait_ms": 0.0, "max_queue": 1000}
    opts.update(kw)
    return Batcher(predict, TOKENIZER.pad, executor=pool, name="m:1", observer=observer, **opts)


def texts(rng: random.Random, n: int, lo: int = 1, hi: int = 30) -> list[list[int]]:
    return [[rng.randrange(2, VOCAB) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


def alone(predict: Callable[[IdArray], ProbArray], encoded: Sequence[Sequence[int]]) -> ProbArray:
    return np.concatenate([predict(TOKENIZER.pad([e])) for e in encoded])


async def wait_for(cond: Callable[[], bool], within_s: float = 5.0) -> None:
    end = time.monotonic() + within_s
    while not cond():
        if time.monotonic() > end:
            raise AssertionError("condition not reached")
        await asyncio.sleep(0.001)


# -- correctness with a real TensorFlow CNN --------------------------------------------------


@pytest.fixture(scope="module")
def tf_predict() -> Iterator[Callable[[IdArray], ProbArray]]:
    import tensorflow as tf

    spec = CnnSpec(embedding_dim=8, filter_widths=(1, 2, 3), num_filters=6, num_classes=4)
    embedding = np.random.default_rng(3).standard_normal((VOCAB, 8)).astype(np.float32)
    embedding[PAD_ID] = 0.0
    graph = tf.Graph()
    with graph.as_default():
        from server.graph import build_cnn

        cnn = build_cnn(spec, lookup=None, seed=7)
        init = tf.compat.v1.global_variables_initializer()
    config = tf.compat.v1.ConfigProto(
        intra_op_parallelism_threads=1, inter_op_parallelism_threads=1
    )
    sess = tf.compat.v1.Session(graph=graph, config=config)
    sess.run(init)

    def predict(ids: IdArray) -> ProbArray:
        out: ProbArray = sess.run(
            cnn.probs, {cnn.input_x: ids, cnn.embedded: np.take(embedding, ids, axis=0)}
        )
        return out

    yield predict
    sess.close()


def test_concurrent_requests_match_each_text_classified_alone(
    tf_predict: Callable[[IdArray], ProbArray], pool: ThreadPoolExecutor
) -> None:
    rng = random.Random(11)
    requests = [texts(rng, rng.randint(1, 5)) for _ in range(120)]
    requests.append(texts(rng, 70))  # one request larger than a batch, chunked by length
    obs = RecordingObserver()

    async def go() -> list[ProbArray]:
        b = make(tf_predict, pool, obs, max_batch_size=16)
        b.start()

        async def one(enc: list[list[int]]) -> ProbArray:
            await asyncio.sleep(rng.random() * 0.02)
            return await b.submit(enc)

        out = await asyncio.gather(*(one(r) for r in requests))
        await b.close(5)
        return out

    results = run(go)
    for enc, got in zip(requests, results, strict=True):
        assert got.shape == (len(enc), 4)
        np.testing.assert_allclose(got, alone(tf_predict, enc), rtol=1e-5, atol=1e-6)
    assert max(obs.sizes) <= 16
    assert sum(obs.sizes) == sum(len(r) for r in requests)
    assert len(obs.sizes) < len(requests), "concurrent requests were never merged"
    assert len(obs.waits) == len(requests)
    assert obs.depths[-1] == 0


def test_queue_depth_is_published_once_per_loop_step(pool: ThreadPoolExecutor) -> None:
    """Ten submits in one event-loop step: one published depth (the step's last), not ten."""
    release = threading.Event()

    def held(ids: IdArray) -> ProbArray:
        release.wait(10)
        return np.full((len(ids), 4), 0.25, dtype=np.float32)

    obs = RecordingObserver()

    async def go() -> list[int]:
        b = make(held, pool, obs, max_batch_size=4, stage_full_batches=False)
        b.start()
        tasks = [asyncio.ensure_future(b.submit([[2, 3]])) for _ in range(10)]
        await asyncio.sleep(0)  # the ten submits run in this step
        assert obs.depths == []  # published after the step, not once per change
        await asyncio.sleep(0)
        published = list(obs.depths)
        assert b.queue_depth == 9  # the first went straight to the (held) predict
        release.set()
        await asyncio.gather(*tasks)
        await b.close(5)
        return published

    assert run(go) == [9]
    assert obs.depths[-1] == 0


# -- scheduling ------------------------------------------------------------------------------


def test_lone_request_on_idle_model_does_not_wait(pool: ThreadPoolExecutor) -> None:
    async def go() -> float:
        b = make(row_probs, pool, max_wait_ms=500.0)
        b.start()
        await b.submit([[2, 3]])  # warm the pool thread
        t0 = time.monotonic()
        await b.submit([[2, 3, 4]])
        return time.monotonic() - t0

    assert run(go) < 0.25


def test_requests_arriving_while_busy_are_merged_into_one_batch(pool: ThreadPoolExecutor) -> None:
    model = GatedModel()
    rng = random.Random(1)
    small = [texts(rng, 1) for _ in range(5)]

    async def go() -> list[ProbArray]:
        b = make(model.predict, pool, max_batch_size=8)
        b.start()
        model.gate.clear()
        first = asyncio.ensure_future(b.submit([[5, 6, 7]]))
        await wait_for(model.started.is_set)
        rest = [asyncio.ensure_future(b.submit(s)) for s in small]
        await asyncio.sleep(0.01)
        assert b.queue_depth == 5
        model.gate.set()
        await first
        return list(await asyncio.gather(*rest))

    results = run(go)
    assert [len(x) for x in model.batches] == [1, 5]
    for enc, got in zip(small, results, strict=True):
        np.testing.assert_array_equal(got, alone(row_probs, enc))


def test_partial_batch_after_short_batch_waits_at_most_max_wait(pool: ThreadPoolExecutor) -> None:
    model = GatedModel()

    async def go() -> float:
        b = make(model.predict, pool, max_batch_size=8, max_wait_ms=200.0)
        b.start()
        model.gate.clear()
        first = asyncio.ensure_future(b.submit([[5, 6, 7]]))
        await wait_for(model.started.is_set)
        second = asyncio.ensure_future(b.submit([[8]]))
        await asyncio.sleep(0.001)
        model.gate.set()  # the first batch ends ~1 ms after the second request arrived
        await first
        t0 = time.monotonic()
        third = asyncio.ensure_future(b.submit([[9]]))  # arrives during the fill window
        await asyncio.gather(second, third)
        return time.monotonic() - t0

    elapsed = run(go)
    assert [len(x) for x in model.batches] == [1, 2], "the fill window did not merge"
    assert elapsed < 1.0


def test_large_request_is_chunked_fairly_and_answered_in_order(pool: ThreadPoolExecutor) -> None:
    model = GatedModel()
    rng = random.Random(5)
    big = texts(rng, 1000)
    small = [texts(rng, rng.randint(1, 3)) for _ in range(6)]
    finished: list[str] = []

    async def go() -> tuple[ProbArray, list[ProbArray]]:
        b = make(model.predict, pool, max_batch_size=64, max_queue=2000)
        b.start()
        model.gate.clear()

        async def tagged(tag: str, enc: list[list[int]]) -> ProbArray:
            out = await b.submit(enc)
            finished.append(tag)
            return out

        big_task = asyncio.ensure_future(tagged("big", big))
        await wait_for(model.started.is_set)
        small_tasks = [asyncio.ensure_future(tagged(f"s{i}", s)) for i, s in enumerate(small)]
        await asyncio.sleep(0.01)
        model.gate.set()
        return await big_task, list(await asyncio.gather(*small_tasks))

    big_out, small_out = run(go)
    sizes = [len(x) for x in model.batches]
    assert max(sizes) <= 64
    assert sum(sizes) == 1000 + sum(len(s) for s in small)
    assert finished[-1] == "big"
    assert set(finished[:-1]) == {f"s{i}" for i in range(6)}
    # all small requests rode in the second batch, next to a chunk of the big one
    assert sizes[1] == 64
    np.testing.assert_array_equal(big_out, alone(row_probs, big))
    for enc, got in zip(small, small_out, strict=True):
        np.testing.assert_array_equal(got, alone(row_probs, enc))


def test_large_request_chunks_group_texts_of_similar_length(pool: ThreadPoolExecutor) -> None:
    rng = random.Random(9)
    big = texts(rng, 256, lo=1, hi=40)

    def padded_cells(group: bool) -> tuple[int, ProbArray]:
        model = GatedModel()

        async def go() -> ProbArray:
            b = make(model.predict, pool, max_batch_size=32, group_by_length=group)
            b.start()
            return await b.submit(big)

        out = run(go)
        assert [len(x) for x in model.batches] == [32] * 8
        return sum(x.size for x in model.batches), out

    grouped, out_grouped = padded_cells(True)
    plain, out_plain = padded_cells(False)
    assert grouped < 0.75 * plain
    np.testing.assert_array_equal(out_grouped, alone(row_probs, big))
    np.testing.assert_array_equal(out_plain, out_grouped)


def test_max_in_flight_two_runs_two_batches_at_once(pool: ThreadPoolExecutor) -> None:
    model = GatedModel()

    async def go() -> None:
        b = make(model.predict, pool, max_batch_size=2, max_in_flight=2, max_wait_ms=300.0)
        b.start()
        model.gate.clear()
        tasks = [asyncio.ensure_future(b.submit([[i + 2]])) for i in range(6)]
        await wait_for(lambda: len(model.batches) == 2)
        # the lone first request started at once, the second predict took a full batch, and
        # one more full batch is staged behind them; the last text waits
        await wait_for(lambda: b.in_flight == 3)
        assert b.queue_depth == 6 - 5
        await asyncio.sleep(0.05)
        assert len(model.batches) == 2, "never more than max_in_flight predicts at once"
        model.gate.set()
        await asyncio.gather(*tasks)

    run(go)
    assert sum(len(x) for x in model.batches) == 6


@pytest.mark.parametrize("stage", [True, False])
def test_a_full_batch_is_staged_but_never_runs_beside_the_running_one(stage: bool) -> None:
    model = GatedModel()
    running = 0
    most = 0
    lock = threading.Lock()

    def predict(ids: IdArray) -> ProbArray:
        nonlocal running, most
        with lock:
            running += 1
            most = max(most, running)
        try:
            return model.predict(ids)
        finally:
            with lock:
                running -= 1

    async def go() -> None:
        with ThreadPoolExecutor(max_workers=4) as wide:
            b = make(predict, wide, max_batch_size=4, stage_full_batches=stage)
            b.start()
            model.gate.clear()
            first = asyncio.ensure_future(b.submit([[2]]))
            await wait_for(model.started.is_set)
            full = [asyncio.ensure_future(b.submit([[3]] * 4)) for _ in range(3)]
            await asyncio.sleep(0.05)
            # staged: one full batch handed to a thread (padded, waiting for the run slot);
            # the other full request stays queued, so it can still merge or be cancelled
            assert b.in_flight == (2 if stage else 1)
            assert b.queue_depth == (8 if stage else 12)
            assert len(model.batches) == 1
            model.gate.set()
            await asyncio.gather(first, *full)

    run(go)
    assert most == 1
    assert [len(x) for x in model.batches] == [1, 4, 4, 4]


# -- bounds and dropped work -----------------------------------------------------------------


def test_full_queue_raises_overloaded_at_once(pool: ThreadPoolExecutor) -> None:
    model = GatedModel()

    async def go() -> None:
        b = make(model.predict, pool, max_queue=10, stage_full_batches=False)
        b.start()
        model.gate.clear()
        running = asyncio.ensure_future(b.submit([[2]]))
        await wait_for(model.started.is_set)
        queued = [asyncio.ensure_future(b.submit([[3], [4]])) for _ in range(5)]
        await asyncio.sleep(0)
        assert b.queue_depth == 10
        t0 = time.monotonic()
        with pytest.raises(Overloaded) as info:
            await b.submit([[5]])
        assert time.monotonic() - t0 < 0.05
        assert info.value.headers() == {"Retry-After": "1"}
        with pytest.raises(PayloadTooLarge):
            await b.submit([[5]] * 11)  # could never fit
        with pytest.raises(BadRequest):
            await b.submit([])
        model.gate.set()
        await asyncio.gather(running, *queued)
        assert b.queue_depth == 0
        await b.submit([[5]])  # room again

    run(go)


def test_cancelled_request_is_dropped_before_it_runs(pool: ThreadPoolExecutor) -> None:
    model = GatedModel()
    gone = [[50, 51, 52], [53]]

    async def go() -> None:
        b = make(model.predict, pool)
        b.start()
        model.gate.clear()
        running = asyncio.ensure_future(b.submit([[2]]))
        await wait_for(model.started.is_set)
        doomed = asyncio.ensure_future(b.submit(gone))
        kept = asyncio.ensure_future(b.submit([[3, 4]]))
        await asyncio.sleep(0)
        assert b.queue_depth == 3
        doomed.cancel()
        with pytest.raises(asyncio.CancelledError):
            await doomed
        assert b.queue_depth == 1
        model.gate.set()
        await asyncio.gather(running, kept)

    run(go)
    assert model.seen_ids().isdisjoint({50, 51, 52, 53})
    assert [len(x) for x in model.batches] == [1, 1]


def test_deadline_passed_in_queue_raises_and_drops_work(pool: ThreadPoolExecutor) -> None:
    model = GatedModel()

    async def go() -> None:
        b = make(model.predict, pool)
        b.start()
        model.gate.clear()
        running = asyncio.ensure_future(b.submit([[2]]))
        await wait_for(model.started.is_set)
        t0 = time.monotonic()
        with pytest.raises(DeadlineExceeded):
            await b.submit([[50, 51]], deadline=t0 + 0.05)
        assert 0.04 < time.monotonic() - t0 < 1.0  # fired by the timer, model still busy
        assert b.queue_depth == 0
        with pytest.raises(DeadlineExceeded):
            await b.submit([[52]], deadline=time.monotonic() - 1)
        late_ok = asyncio.ensure_future(b.submit([[3]], deadline=time.monotonic() + 30))
        model.gate.set()
        await asyncio.gather(running, late_ok)

    run(go)
    assert model.seen_ids().isdisjoint({50, 51, 52})


def test_failing_predict_fails_its_batch_and_the_batcher_goes_on(pool: ThreadPoolExecutor) -> None:
    model = GatedModel()
    model.fail_next = ValueError("boom")

    async def go() -> None:
        b = make(model.predict, pool)
        b.start()
        with pytest.raises(ValueError, match="boom"):
            await b.submit([[2]])
        np.testing.assert_array_equal(await b.submit([[2, 3]]), row_probs(np.array([[2, 3]])))

    run(go)


def test_close_drains_queued_work_and_refuses_new(pool: ThreadPoolExecutor) -> None:
    model = GatedModel()
    rng = random.Random(2)
    queued_texts = [texts(rng, 3) for _ in range(4)]

    async def go() -> list[ProbArray]:
        b = make(model.predict, pool, max_batch_size=4)
        b.start()
        model.gate.clear()
        running = asyncio.ensure_future(b.submit([[2]]))
        await wait_for(model.started.is_set)
        queued = [asyncio.ensure_future(b.submit(t)) for t in queued_texts]
        await asyncio.sleep(0)
        closing = asyncio.ensure_future(b.close(timeout=10))
        await asyncio.sleep(0.01)
        assert not closing.done()
        with pytest.raises(ShuttingDown):
            await b.submit([[3]])
        model.gate.set()
        await closing
        assert b.queue_depth == 0
        assert b.in_flight == 0
        await running
        return [q.result() for q in queued]

    results = run(go)
    for enc, got in zip(queued_texts, results, strict=True):
        np.testing.assert_array_equal(got, alone(row_probs, enc))


def test_close_gives_up_after_timeout(pool: ThreadPoolExecutor) -> None:
    model = GatedModel()

    async def go() -> None:
        b = make(model.predict, pool)
        b.start()
        model.gate.clear()
        running = asyncio.ensure_future(b.submit([[2]]))
        await wait_for(model.started.is_set)
        queued = asyncio.ensure_future(b.submit([[3]]))
        t0 = time.monotonic()
        await b.close(timeout=0.1)
        assert 0.09 < time.monotonic() - t0 < 1.0
        for task in (running, queued):
            with pytest.raises(ShuttingDown):
                await task
        model.gate.set()

    run(go)
    assert len(model.batches) == 1


# -- idle split ------------------------------------------------------------------------------


@pytest.fixture
def split_pool() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(max_workers=1) as ex:
        yield ex


def test_a_lone_request_runs_as_concurrent_slices(
    pool: ThreadPoolExecutor, split_pool: ThreadPoolExecutor
) -> None:
    model = GatedModel()
    encoded = texts(random.Random(5), 21)

    async def go() -> ProbArray:
        b = make(model.predict, pool, max_batch_size=32, idle_split=2, split_executor=split_pool)
        b.start()
        model.gate.clear()
        task = asyncio.ensure_future(b.submit(encoded))
        await wait_for(lambda: len(model.batches) == 2)  # both slices run at once
        assert b.in_flight == 1, "the slices are one batch to the scheduler"
        model.gate.set()
        return await task

    out = run(go)
    assert sorted(len(x) for x in model.batches) == [10, 11]
    np.testing.assert_array_equal(out, alone(row_probs, encoded))


def test_back_to_back_batches_and_small_ones_run_whole(
    pool: ThreadPoolExecutor, split_pool: ThreadPoolExecutor
) -> None:
    model = GatedModel()
    rng = random.Random(6)
    small, queued = texts(rng, 15), texts(rng, 24)

    async def go() -> list[ProbArray]:
        b = make(model.predict, pool, max_batch_size=32, idle_split=2, split_executor=split_pool)
        b.start()
        model.gate.clear()
        first = asyncio.ensure_future(b.submit(small))  # idle, but under 2 x 8 texts
        await wait_for(lambda: len(model.batches) == 1)
        second = asyncio.ensure_future(b.submit(queued))  # waits behind a running batch
        await wait_for(lambda: b.queue_depth == 24)
        model.gate.set()
        return list(await asyncio.gather(first, second))

    out = run(go)
    assert [len(x) for x in model.batches] == [15, 24]
    np.testing.assert_array_equal(out[0], alone(row_probs, small))
    np.testing.assert_array_equal(out[1], alone(row_probs, queued))


def test_a_failing_slice_fails_the_request_after_every_slice_ended(
    pool: ThreadPoolExecutor, split_pool: ThreadPoolExecutor
) -> None:
    ended: list[int] = []

    def predict(ids: IdArray) -> ProbArray:
        time.sleep(0.02 if len(ids) == 10 else 0.0)
        ended.append(len(ids))
        if len(ids) == 11:
            raise RuntimeError("slice failed")
        return row_probs(ids)

    async def go() -> None:
        b = make(predict, pool, max_batch_size=32, idle_split=2, split_executor=split_pool)
        b.start()
        with pytest.raises(RuntimeError, match="slice failed"):
            await b.submit(texts(random.Random(7), 21))
        assert sorted(ended) == [10, 11]

    run(go)


def test_idle_split_needs_an_executor(pool: ThreadPoolExecutor) -> None:
    with pytest.raises(ValueError, match="split_executor"):
        make(row_probs, pool, idle_split=2)
    with pytest.raises(ValueError, match="idle_split"):
        make(row_probs, pool, idle_split=0)
