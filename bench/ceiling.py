"""In-process ceilings: how fast the model itself runs, with no HTTP in the way.

* ``runtime``: the server's own :class:`~server.runtime.base.Runtime` (same loader, same thread
  settings), ``predict`` on pre-tokenized, padded batches of 64 texts (the gather runs inside
  the session, from the shared store's matrix).
* ``raw``: for reference, one ``session.run`` of the same architecture with the embedding as a
  graph variable and the gather inside the graph (weights random: speed does not depend on
  them). Only for models with an ``architecture`` in model.json.
* ``tokenize``: texts/s of ``Tokenizer.encode`` + ``pad`` alone (part of every HTTP request).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from bench.models import BenchModel, random_weights
from server.text import IdArray, Tokenizer


@dataclass(frozen=True)
class Rate:
    texts_per_s: float
    calls: int
    batch: int
    p50_ms: float
    """Median time of one call."""
    cpu_us_per_text: float
    """CPU time (all of this process's threads) per text."""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def batches_of(tokenizer: Tokenizer, texts: Sequence[str], batch: int) -> list[IdArray]:
    return [
        tokenizer.encode_batch(texts[i : i + batch])
        for i in range(0, len(texts) - batch + 1, batch)
    ]


def measure(fn: Callable[[IdArray], object], batches: Sequence[IdArray], seconds: float) -> Rate:
    """Call ``fn`` over ``batches`` round-robin for ``seconds`` (after two warm-up calls)."""
    for b in batches[:2]:
        fn(b)
    times: list[float] = []
    texts = 0
    cpu0 = time.process_time()
    start = time.perf_counter()
    i = 0
    while True:
        b = batches[i % len(batches)]
        t0 = time.perf_counter()
        fn(b)
        t1 = time.perf_counter()
        times.append(t1 - t0)
        texts += len(b)
        i += 1
        if t1 - start >= seconds:
            break
    elapsed = time.perf_counter() - start
    cpu = time.process_time() - cpu0
    return Rate(
        texts / elapsed,
        len(times),
        len(batches[0]),
        statistics.median(times) * 1000,
        cpu / texts * 1e6,
    )


def load_server_runtime(model: BenchModel, intra_op_threads: int = 2) -> Any:
    from server.embeddings import EmbeddingStore
    from server.runtime.loader import load_runtime

    return load_runtime(
        model.version_dir,
        store=EmbeddingStore(),
        embedding_dir=model.embedding_dir,
        intra_op_threads=intra_op_threads,
        inter_op_threads=1,
    )


def runtime_rate(runtime: Any, texts: Sequence[str], seconds: float, batch: int = 64) -> Rate:
    return measure(runtime.predict, batches_of(runtime.tokenizer, texts, batch), seconds)


def raw_rate(
    model: BenchModel, texts: Sequence[str], seconds: float, batch: int = 64
) -> Rate | None:
    """``session.run`` with the gather inside the graph (embedding as a variable)."""
    from models.embeddings import load_embedding
    from models.export import inference_session
    from models.train import TrainedModel

    arch = model.manifest.architecture
    if arch is None or model.embedding_dir is None:
        return None
    art = load_embedding(model.embedding_dir)
    trained = TrainedModel(
        spec=arch,
        tokenizer=model.manifest.tokenizer,
        labels=model.manifest.labels,
        weights=random_weights(arch, 0),
        embedding=art,
    )
    tokenizer = Tokenizer(art.vocab, model.manifest.tokenizer)
    batches = batches_of(tokenizer, texts, batch)
    with inference_session(trained, with_embedding=True) as (session, cnn):
        run = session.make_callable(cnn.probs, [cnn.input_x])
        return measure(run, batches, seconds)


def tokenize_rate(tokenizer: Tokenizer, texts: Sequence[str], seconds: float) -> Rate:
    chunks = [list(texts[i : i + 64]) for i in range(0, len(texts) - 63, 64)]
    times: list[float] = []
    n = 0
    cpu0 = time.process_time()
    start = time.perf_counter()
    i = 0
    while time.perf_counter() - start < seconds:
        c = chunks[i % len(chunks)]
        t0 = time.perf_counter()
        tokenizer.encode_batch(c)
        times.append(time.perf_counter() - t0)
        n += len(c)
        i += 1
    elapsed = time.perf_counter() - start
    cpu = time.process_time() - cpu0
    return Rate(n / elapsed, len(times), 64, statistics.median(times) * 1000, cpu / n * 1e6)
