"""In-process measurements behind two batcher choices, on the server's real runtime.

* **length grouping**: one request of 1024 mixed-length texts, chunked into batches of 64 in
  arrival order vs. in order of length (``group_by_length``): wall time and padded cells.
* **predicts in flight**: 64 closed-loop clients submitting one text each, with at most 1 vs 2
  ``predict`` calls running at once (2 executor threads and ``max_wait_ms``: the server's
  defaults; texts tokenized per batch, as in the server); the two
  settings alternate ``reps`` times and the medians are reported.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from server.batching import Batcher
from server.runtime.base import ProbArray
from server.settings import Settings
from server.text import IdArray


class _PaddingMeter:
    """Wraps ``pad`` to count the cells and real tokens of every batch it builds."""

    def __init__(self, runtime: Any) -> None:
        self._pad = runtime.tokenizer.pad
        self.cells = 0
        self.real = 0

    def pad(self, encoded: Sequence[Sequence[int]]) -> IdArray:
        ids: IdArray = self._pad(encoded)
        self.cells += ids.size
        self.real += int(np.count_nonzero(ids))
        return ids


def length_grouping(
    runtime: Any, texts: Sequence[str], reps: int = 5, size: int = 1024
) -> dict[str, Any]:
    encoded = [runtime.tokenizer.encode(t) for t in texts[:size]]
    lengths = [len(e) for e in encoded]
    out: dict[str, Any] = {
        "texts": len(encoded),
        "tokens_min": min(lengths),
        "tokens_median": statistics.median(lengths),
        "tokens_max": max(lengths),
    }

    async def one(group: bool, meter: _PaddingMeter, pool: ThreadPoolExecutor) -> float:
        b = Batcher(
            runtime.predict,
            meter.pad,
            max_batch_size=64,
            max_wait_ms=0,
            max_queue=4096,
            executor=pool,
            group_by_length=group,
        )
        b.start()
        t0 = time.perf_counter()
        result: ProbArray = await b.submit(encoded)
        elapsed = time.perf_counter() - t0
        assert result.shape[0] == len(encoded)
        await b.close(10)
        return elapsed

    with ThreadPoolExecutor(2) as pool:
        for group in (False, True, False, True):  # first pair warms up
            meter = _PaddingMeter(runtime)
            times = [asyncio.run(one(group, meter, pool)) for _ in range(reps)]
            out["grouped" if group else "arrival_order"] = {
                "median_ms": statistics.median(times) * 1000,
                "padded_fraction": 1 - meter.real / meter.cells,
            }
    out["speedup"] = out["arrival_order"]["median_ms"] / out["grouped"]["median_ms"]
    return out


def in_flight(
    runtime: Any, texts: Sequence[str], seconds: float, clients: int = 64, reps: int = 3
) -> dict[str, Any]:
    async def run(limit: int, pool: ThreadPoolExecutor) -> dict[str, float]:
        b = Batcher(  # as the server builds it: raw texts, tokenized per batch
            runtime.predict,
            runtime.tokenizer.encode_batch,
            max_batch_size=64,
            max_wait_ms=Settings(_env_file=None).max_wait_ms,
            max_queue=4096,
            executor=pool,
            max_in_flight=limit,
        )
        b.start()
        latencies: list[float] = []
        end = time.monotonic() + seconds

        async def client(k: int) -> None:
            i = k
            while time.monotonic() < end:
                t0 = time.monotonic()
                await b.submit([texts[i % len(texts)]])
                latencies.append(time.monotonic() - t0)
                i += clients

        t0 = time.monotonic()
        await asyncio.gather(*(client(k) for k in range(clients)))
        elapsed = time.monotonic() - t0
        await b.close(10)
        lat = np.array(latencies)
        return {
            "texts_per_s": len(latencies) / elapsed,
            "p50_ms": float(np.percentile(lat, 50) * 1000),
            "p99_ms": float(np.percentile(lat, 99) * 1000),
        }

    with ThreadPoolExecutor(2) as pool:
        asyncio.run(run(1, pool))  # warm-up
        samples: dict[int, list[dict[str, float]]] = {1: [], 2: []}
        for _ in range(reps):  # alternate, so both see the same machine load
            for n in (1, 2):
                samples[n].append(asyncio.run(run(n, pool)))
    results = {
        f"max_in_flight_{n}": {k: float(statistics.median(s[k] for s in rows)) for k in rows[0]}
        for n, rows in samples.items()
    }
    return {"clients": clients, "repetitions": reps, **results}
