"""In-process ceilings: how fast the model itself runs, with no HTTP in the way.

* ``runtime``: the server's own :class:`~server.runtime.base.Runtime` (same loader, same thread
  settings), ``predict`` on pre-tokenized, padded batches of 64 texts (the gather runs inside
  the session, from the shared store's matrix).
* ``raw``: for reference, one ``session.run`` of the same architecture with the embedding as a
  graph variable and the gather inside the graph (weights random: speed does not depend on
  them). Only for models with an ``architecture`` in model.json.
* ``tokenize``: texts/s of ``Tokenizer.encode`` + ``pad`` alone (part of every HTTP request).
* ``two_callers``: ``predict`` called from two threads at once on a runtime with one intra-op
  and two inter-op threads — what two concurrent predicts (two ``--workers``, or
  ``max_in_flight: 2``) can get out of the machine. On 2 cores it is above ``runtime``
  (TensorFlow's intra-op split costs ~10 % CPU per text), so it is the honest yardstick for
  setups that run two predicts at once. Measured in a fresh process
  (``python -m bench.ceiling``): TensorFlow sizes its thread pools once per process, at the
  first session.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
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


def measure(
    fn: Callable[[IdArray], object],
    batches: Sequence[IdArray],
    seconds: float,
    callers: int = 1,
) -> Rate:
    """Call ``fn`` over ``batches`` round-robin for ``seconds`` from ``callers`` threads at once
    (after a warm-up call per caller, at least two); texts/s over all of them, median call
    time, CPU (all threads) per text. Each caller makes at least one call."""
    for b in batches[: max(2, callers)]:
        fn(b)
    times: list[list[float]] = [[] for _ in range(callers)]
    sizes: list[int] = [0] * callers
    start = time.perf_counter()

    def call(k: int) -> None:
        i = k
        while True:
            b = batches[i % len(batches)]
            t0 = time.perf_counter()
            fn(b)
            t1 = time.perf_counter()
            times[k].append(t1 - t0)
            sizes[k] += len(b)
            i += callers
            if t1 - start >= seconds:
                return

    cpu0 = time.process_time()
    if callers == 1:
        call(0)  # on this thread, as the ceiling has always been measured
    else:
        threads = [threading.Thread(target=call, args=(k,)) for k in range(callers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    elapsed = time.perf_counter() - start
    cpu = time.process_time() - cpu0
    every = [t for ts in times for t in ts]
    texts = sum(sizes)
    return Rate(
        texts / elapsed,
        len(every),
        len(batches[0]),
        statistics.median(every) * 1000,
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


def two_callers_rate(model: BenchModel, texts: Sequence[str], seconds: float) -> Rate:
    """:func:`measure` of ``predict`` from 2 threads, 1 intra-op + 2 inter-op threads, in a
    fresh Python process (this one's TensorFlow pools are already sized)."""
    with tempfile.NamedTemporaryFile("w", suffix=".json") as f:
        json.dump(list(texts), f)
        f.flush()
        cmd = [sys.executable, "-m", "bench.ceiling", str(model.version_dir), f.name]
        cmd += ["--seconds", str(seconds)]
        if model.embedding_dir is not None:
            cmd += ["--embedding-dir", str(model.embedding_dir)]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=600)
    return Rate(**json.loads(proc.stdout.strip().splitlines()[-1]))


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m bench.ceiling VERSION_DIR TEXTS_JSON [--embedding-dir DIR]``: print the
    two-caller rate as one JSON line."""
    parser = argparse.ArgumentParser(prog="python -m bench.ceiling")
    parser.add_argument("version_dir", type=Path)
    parser.add_argument("texts_json", type=Path)
    parser.add_argument("--embedding-dir", type=Path, default=None)
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--callers", type=int, default=2)
    args = parser.parse_args(argv)
    from server.embeddings import EmbeddingStore
    from server.runtime.loader import load_runtime

    runtime = load_runtime(
        args.version_dir,
        store=EmbeddingStore(),
        embedding_dir=args.embedding_dir,
        intra_op_threads=1,
        inter_op_threads=args.callers,
    )
    batches = batches_of(runtime.tokenizer, json.loads(args.texts_json.read_text()), 64)
    rate = measure(runtime.predict, batches, args.seconds, callers=args.callers)
    print(json.dumps(rate.as_dict()))
    return 0


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


if __name__ == "__main__":
    sys.exit(main())
