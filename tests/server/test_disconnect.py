"""A client that goes away while its request waits for the model: its remaining chunks never run.

Real uvicorn, real model (``pos-small-batch``: ``max_batch_size`` 8, so a 1024-text request is
128 chunks), raw sockets. The number of ``session.run`` calls is read from the batcher's own
histogram (``textserve_batch_size_count``) on ``GET /metrics``.
"""

from __future__ import annotations

import json
import socket
import time

import httpx

from server.registry import ModelVersion
from tests.server.conftest import SMALL_BATCH, LiveServer

TEXTS = 1024
CHUNKS = TEXTS // 8
CLASSIFY = f"/v1/models/{SMALL_BATCH}:classify"


def _batches(client: httpx.Client) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    total = 0.0
    for family in text_string_to_metric_families(client.get("/metrics").text):
        for s in family.samples:
            if s.name == "textserve_batch_size_count" and s.labels.get("model") == SMALL_BATCH:
                total += s.value
    return total


def _requests_with_status(client: httpx.Client, status: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    total = 0.0
    for family in text_string_to_metric_families(client.get("/metrics").text):
        for s in family.samples:
            if (
                s.name == "textserve_requests_total"
                and s.labels.get("model") == SMALL_BATCH
                and s.labels.get("status") == status
            ):
                total += s.value
    return total


def _body() -> bytes:
    words = ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "by", "the"]
    texts = [" ".join(words[(i + j) % len(words)] for j in range(60)) for i in range(TEXTS)]
    return json.dumps({"texts": texts}).encode()


def _raw_request(url: str, body: bytes) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)))
    head = (
        f"POST {CLASSIFY} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    sock.sendall(head + body)
    return sock


def _serving(live: LiveServer) -> ModelVersion:
    return live.registry.get(SMALL_BATCH)


def _wait_idle(mv: ModelVersion, within_s: float = 60.0) -> None:
    assert mv.batcher is not None
    deadline = time.monotonic() + within_s
    while mv.batcher.queue_depth or mv.batcher.in_flight:
        assert time.monotonic() < deadline, "the model never went idle"
        time.sleep(0.01)


def test_disconnected_client_work_is_dropped(client: httpx.Client, live_server: LiveServer) -> None:
    body = _body()
    mv = _serving(live_server)
    assert mv.batcher is not None
    _wait_idle(mv)

    # Control: the same request, answered, runs every one of its chunks.
    before = _batches(client)
    r = client.post(CLASSIFY, content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 200
    assert len(r.json()["results"]) == TEXTS
    assert _batches(client) - before == CHUNKS

    # The client closes its socket once the model has started on the request.
    closed_before = _requests_with_status(client, "499")
    before = _batches(client)
    sock = _raw_request(live_server.url, body)
    deadline = time.monotonic() + 30
    while mv.batcher.queue_depth == 0:  # not queued yet (body still being read/tokenized)
        assert time.monotonic() < deadline, "the request never reached the batcher"
        time.sleep(0.0005)
    queued_at_close = mv.batcher.queue_depth
    sock.close()
    _wait_idle(mv)
    ran = _batches(client) - before
    # Chunks already started finish; at the close at least a handful were still queued and
    # none of the ones queued after the disconnect was noticed may run.
    assert queued_at_close > 8 * 8
    assert ran < CHUNKS - 8, f"{ran} of {CHUNKS} chunks ran after the client went away"

    # The request is counted as 499 (client closed request), not as an error of the server.
    deadline = time.monotonic() + 10
    while _requests_with_status(client, "499") == closed_before:
        assert time.monotonic() < deadline, "the dropped request was never counted"
        time.sleep(0.05)
    assert _requests_with_status(client, "500") == 0
