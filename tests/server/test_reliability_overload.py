"""Overload and deadlines, measured on a real ``textserve serve`` process.

* A burst far beyond capacity — many concurrent clients sending large requests to a model with
  a small queue bound — gets 503 + ``Retry-After`` for the excess, fast (the p99 of the 503s is
  well under the median latency of accepted requests), while every accepted request is answered
  correctly; the server's RSS stays bounded during the burst and its latency is back to normal
  right after.
* ``X-Request-Timeout-Ms``: a request whose deadline passes before its texts start gets 504, and
  its texts never run (the model's batch-size histogram counts only the texts that did).
"""

from __future__ import annotations

import asyncio
import socket
import statistics
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from server.api.deadline import TIMEOUT_HEADER
from tests.serve_process import Connection, Reply, ServeProcess, metric, repo_with, serving

MODEL = "pos"
PATH = f"/v1/models/{MODEL}:classify"
MAX_QUEUE = 256
BATCH = 64
CLIENTS = 32
TEXTS_PER_REQUEST = 128
BURST_SECONDS = 3.0

WORDS = [
    "the",
    "small",
    "brown",
    "dog",
    "ran",
    "quickly",
    "across",
    "a",
    "wide",
    "green",
    "field",
    "while",
    "an",
    "old",
    "man",
    "watched",
    "it",
    "from",
    "a",
    "wooden",
    "bench",
    "near",
    "the",
    "river",
    "and",
    "slowly",
    "ate",
    "his",
    "bread",
]


def texts(n: int, seed: int, words: int = 80) -> list[str]:
    return [
        " ".join(WORDS[(seed * 7 + i * 3 + j) % len(WORDS)] for j in range(words)) for i in range(n)
    ]


@pytest.fixture(scope="module")
def server(small_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    root = tmp_path_factory.mktemp("overload")
    repo = repo_with(small_repo, root / "repo", [MODEL])
    with serving(
        repo,
        "--max-queue",
        str(MAX_QUEUE),
        "--max-batch-size",
        str(BATCH),
        "--inference-threads",
        "1",
        log=root / "serve.log",
    ) as served:
        yield served


async def sequential_latency(url: str, n: int) -> float:
    """Median seconds of ``n`` one-at-a-time requests (the server idle otherwise)."""
    conn = Connection(url)
    seconds = []
    bodies = [orjson.dumps({"texts": texts(TEXTS_PER_REQUEST, 1000 + i)}) for i in range(n)]
    try:
        for body in bodies:
            reply = await conn.post(PATH, body)
            assert reply.status == 200, reply.body
            seconds.append(reply.seconds)
    finally:
        await conn.close()
    return statistics.median(seconds)


async def burst(url: str, reference: dict[int, list[str]]) -> list[tuple[Reply, int]]:
    """``CLIENTS`` connections sending back to back for ``BURST_SECONDS``."""
    bodies = {seed: orjson.dumps({"texts": texts(TEXTS_PER_REQUEST, seed)}) for seed in reference}
    stop = time.monotonic() + BURST_SECONDS
    replies: list[tuple[Reply, int]] = []

    async def client(c: int) -> None:
        conn = Connection(url)
        i = c
        try:
            while time.monotonic() < stop:
                seed = i % len(bodies)
                replies.append((await conn.post(PATH, bodies[seed]), seed))
                i += CLIENTS
        finally:
            await conn.close()

    await asyncio.gather(*(client(c) for c in range(CLIENTS)))
    return replies


def test_burst_beyond_capacity(server: ServeProcess) -> None:
    # Reference answers (the model is deterministic) and the idle latency.
    reference: dict[int, list[str]] = {}
    with httpx.Client(base_url=server.url, timeout=60) as c:
        for seed in range(8):
            r = c.post(PATH, json={"texts": texts(TEXTS_PER_REQUEST, seed)})
            assert r.status_code == 200
            reference[seed] = [x["label"] for x in r.json()["results"]]
    before = asyncio.run(sequential_latency(server.url, 30))
    rss_idle = server.rss()

    peak = [rss_idle]
    sampling = threading.Event()

    def sample() -> None:
        while not sampling.is_set():
            peak.append(server.rss())
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        replies = asyncio.run(burst(server.url, reference))
    finally:
        sampling.set()
        sampler.join(10)

    accepted = [(r, seed) for r, seed in replies if r.status == 200]
    refused = [r for r, _ in replies if r.status == 503]
    assert {r.status for r, _ in replies} <= {200, 503}, {r.status for r, _ in replies}
    assert len(accepted) >= 20, len(accepted)
    assert len(refused) >= len(accepted), (len(refused), len(accepted))
    for reply, seed in accepted:
        answer = orjson.loads(reply.body)
        assert answer["version"] == "2"
        assert [x["label"] for x in answer["results"]] == reference[seed]
    for reply in refused:
        assert reply.headers["retry-after"] == "1"
        assert reply.headers["content-type"] == "application/json"
        assert "overloaded" in orjson.loads(reply.body)["error"]

    ok_median = statistics.median(r.seconds for r, _ in accepted)
    refused_p99 = statistics.quantiles([r.seconds for r in refused], n=100)[98]
    refused_median = statistics.median(r.seconds for r in refused)
    after = asyncio.run(sequential_latency(server.url, 30))
    growth = max(peak) - rss_idle
    print(
        f"\nburst: {len(replies)} requests in {BURST_SECONDS:.0f} s from {CLIENTS} clients, "
        f"{len(accepted)} accepted (median {ok_median * 1e3:.1f} ms), {len(refused)} refused "
        f"(median {refused_median * 1e3:.1f} ms, p99 {refused_p99 * 1e3:.1f} ms); "
        f"idle median {before * 1e3:.1f} ms before, "
        f"{after * 1e3:.1f} ms after; RSS {rss_idle / 2**20:.0f} MiB idle, "
        f"+{growth / 2**20:.1f} MiB peak"
    )
    # Refusals never wait for inference: a typical one is answered in a small fraction of an
    # accepted request's time, and even the slowest (the event loop shares the GIL with the
    # tokenizing thread under this burst) well within it. A refusal costs event-loop time only,
    # so its median is the loop's turn around 32 busy clients: 4.2-6.5 ms in three runs with
    # the compiled tokenizer, while accepted requests took 43-53 ms (220-330 ms when batches
    # were tokenized in numpy: then 0.1 of it was the bound).
    assert refused_median < 0.25 * ok_median, (refused_median, ok_median)
    assert refused_p99 < ok_median, (refused_p99, ok_median)
    assert growth < 64 * 2**20, growth
    assert after < 2 * before + 0.005, (before, after)


def _held_request(url: str, path: str, body: bytes, headers: dict[str, str], pause: float) -> int:
    """Send the headers and half the body, wait ``pause`` s, send the rest; the status."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        sock.sendall(
            f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n{head}\r\n".encode()
        )
        sock.sendall(body[: len(body) // 2])
        time.sleep(pause)
        sock.sendall(body[len(body) // 2 :])
        answer = sock.recv(65536)
    return int(answer.split(b" ", 2)[1])


def test_deadline_passed_while_the_body_arrives_is_504(server: ServeProcess) -> None:
    body = orjson.dumps({"texts": ["to run quickly"]})
    status = _held_request(server.url, PATH, body, {TIMEOUT_HEADER: "100"}, pause=0.3)
    assert status == 504
    # The same request within its deadline is answered.
    assert _held_request(server.url, PATH, body, {TIMEOUT_HEADER: "5000"}, pause=0.05) == 200
    with httpx.Client(base_url=server.url) as c:
        r = c.post(PATH, json={"texts": ["a"]}, headers={TIMEOUT_HEADER: "60000"})
        assert r.status_code == 200


def test_deadline_exceeded_in_the_queue_drops_the_work(server: ServeProcess) -> None:
    """Requests queued behind a long request with a 1 ms deadline: 504, and their texts never
    reach the model (the batch-size histogram's sum counts every text that ran)."""
    small = [texts(5, 100 + i) for i in range(12)]
    # The long request and the small ones fit in the queue together (no 503 whatever the order).
    big = {"texts": texts(MAX_QUEUE - sum(len(t) for t in small), 7, words=100)}
    before = metric(server.url, "textserve_batch_size_sum", model=MODEL, version="2")

    async def scenario() -> tuple[Reply, list[Reply]]:
        conns = [Connection(server.url) for _ in range(len(small) + 1)]
        try:
            await asyncio.gather(*(conn.open() for conn in conns))
            first = asyncio.ensure_future(conns[0].post(PATH, orjson.dumps(big)))
            await asyncio.sleep(0.005)  # the long request is running
            late = [
                conns[i + 1].post(PATH, orjson.dumps({"texts": t}), {TIMEOUT_HEADER: "1"})
                for i, t in enumerate(small)
            ]
            rest = await asyncio.gather(*late)
            return await first, list(rest)
        finally:
            for conn in conns:
                await conn.close()

    first, replies = asyncio.run(scenario())
    assert first.status == 200
    statuses = [r.status for r in replies]
    assert set(statuses) <= {200, 504}, statuses
    assert statuses.count(504) >= 1, statuses  # usually most of them
    for r in replies:
        if r.status == 504:
            assert "deadline" in orjson.loads(r.body)["error"]
    ran = sum(len(t) for t, r in zip(small, replies, strict=True) if r.status == 200)
    time.sleep(0.2)
    after = metric(server.url, "textserve_batch_size_sum", model=MODEL, version="2")
    assert after - before == len(big["texts"]) + ran, (after - before, ran, statuses)


def test_the_server_is_still_healthy(server: ServeProcess) -> None:
    assert server.proc.poll() is None
    with httpx.Client(base_url=server.url) as c:
        assert c.get("/v2/health/ready").status_code == 200
        r: Any = c.post(PATH, json={"texts": ["to run quickly"]})
        assert r.status_code == 200
