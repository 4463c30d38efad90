"""``textserve memory-report``: what each compression strategy costs in RAM, time and accuracy.

    textserve memory-report --repo REPO --out DIR [--scales demo seed] [--counts 1 3 10]

Every case runs in a fresh Python process (``python -m models.commands.memory_report
--worker``), so figures never leak from one case into the next. A case measures, above the
process's own "bare TF process" baseline (TensorFlow imported and its runtime initialised by a
throw-away 2-filter CNN, no model loaded; growth above ``import tensorflow`` alone is recorded
too, see ``_baseline``): RSS and
USS after loading + warming up its N models, and after their first request; the load time;
first-request latency; steady latency at batch 1 and 64 (medians); throughput at batch 64; the
exact tensor bytes (models' own weights + each distinct embedding once); and, on the demo set,
accuracy on the test split (compared with float32 by the parent).

Two scales:

``demo``  the repository given with ``--repo`` (``textserve build-demo``): its models, cycled
          to make sets of N model versions, over float32 (shared / one private copy per model),
          float16, int8 and a vocabulary pruned to the top ``--vocab-keep`` training tokens.
``seed``  a generated 220k x 300 float32 embedding (the seed's scale) and ten random-weight
          CNNs (widths 1-3 x 128 filters), written with the toolchain's exporters into the work
          directory: the same strategies, plus files on disk (full checkpoint, stripped
          checkpoint, self-contained frozen GraphDef, magnitude-pruned checkpoints raw/gzip), and
          plain TensorFlow loading the frozen GraphDef vs the stripped checkpoint (RAM, first
          ``session.run``) next to textserve loading the same files.

Writes ``report.md`` (tables + targets), ``report.json`` (everything) and
``memory_vs_models.png`` (memory above bare TF vs number of models, one line per strategy).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from server.artifact import (
    EMBEDDINGS_DIR,
    MATRIX_NPY,
    CnnSpec,
    ModelFormat,
    TokenizerSpec,
    list_versions,
    load_embedding_manifest,
    load_model_manifest,
    load_repository_config,
    resolve_inside,
    select_versions,
)
from server.errors import ArtifactError, UsageError
from server.memory import process_memory

MiB = 2**20
CASE_TIMEOUT_S = 1800
SEED_MODELS = 10
SEED_EMBEDDING = "seed-220k-300d"
SEED_LABELS = 10
SEED_TOKENS = 50
SEED_SPEC = CnnSpec(embedding_dim=300, filter_widths=(1, 2, 3), num_filters=128, num_classes=10)
PRUNE_SPARSITIES = (0.5, 0.8, 0.9)

# strategy → (embedding dtype, shared?, title)
STRATEGIES: dict[str, tuple[str, bool, str]] = {
    "float32-private": ("float32", False, "float32, one private copy per model (no sharing)"),
    "float32": ("float32", True, "float32, shared (mmap'd once per process)"),
    "float16": ("float16", True, "float16, shared"),
    "int8": ("int8", True, "int8 + per-row scales, shared"),
    "vocab": ("float32", True, "float32, vocabulary pruned to the top training tokens, shared"),
    "float32-lean": ("float32", True, "float32, shared; TensorFlow on malloc (lean_tensorflow)"),
    "int8-lean": ("int8", True, "int8, shared; TensorFlow on malloc (lean_tensorflow)"),
}
SEED_STRATEGIES = ("float32-private", "float32", "float16", "int8", "float32-lean", "int8-lean")
LEAN_STRATEGIES = frozenset({"float32-lean", "int8-lean"})
"""Served with ``lean_tensorflow`` (TensorFlow's oneDNN tensors from malloc, not a pool)."""


# =============================================================================================
# Worker side (runs in a fresh process)


def _smaps_rollup() -> dict[str, int]:
    """``/proc/self/smaps_rollup`` fields in bytes (Linux; empty elsewhere).

    Unlike ``/proc/self/status`` (per-thread counters synced lazily, wrong while TensorFlow's
    threads allocate), smaps_rollup walks the page tables, so it is exact.
    """
    try:
        text = Path("/proc/self/smaps_rollup").read_text(encoding="ascii")
    except OSError:
        return {}
    out = {}
    for line in text.splitlines()[1:]:
        key, _, value = line.partition(":")
        parts = value.split()
        if len(parts) == 2 and parts[1] == "kB":
            out[key] = int(parts[0]) * 1024
    return out


def _measure() -> dict[str, int]:
    """RSS/USS/PSS now, plus RSS split into anonymous (heap) and file-backed (mmap'd files) pages.

    ``anon`` does not depend on other processes: USS does (a library page becomes "private"
    when the last other process mapping it exits), so on a shared machine USS deltas are noisy.
    """
    m = process_memory()
    rollup = _smaps_rollup()
    anon = rollup.get("Anonymous", 0)
    return {
        "rss": m.rss,
        "uss": m.uss,
        "pss": m.pss,
        "anon": anon,
        "file": max(0, rollup.get("Rss", 0) - anon),
    }


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 3)


def _median_ms(fn: Callable[[int], object], runs: int) -> float:
    times = []
    for i in range(runs):
        t0 = time.perf_counter()
        fn(i)
        times.append(time.perf_counter() - t0)
    return _ms(statistics.median(times))


def _initialise_tf_runtime() -> None:
    """Run a throw-away 2-filter CNN once (same op types and warm-up shapes as the models).

    This pays TensorFlow's one-off, per-process costs (session runtime, thread pools, oneDNN
    kernels, library pages) that the first model of any TF server pays whatever the model;
    its own weights are a few hundred bytes and its session is closed again.
    """
    import tensorflow as tf

    from server.artifact import CnnSpec
    from server.graph import build_cnn

    graph = tf.Graph()
    with graph.as_default():
        net = build_cnn(CnnSpec(embedding_dim=8, num_classes=2, num_filters=2))
        init = tf.compat.v1.global_variables_initializer()
    with tf.compat.v1.Session(graph=graph) as sess:
        sess.run(init)
        for batch, length in ((1, 3), (64, 64)):
            ids = np.ones((batch, length), dtype=np.int32)
            rows = np.zeros((batch, length, 8), dtype=np.float32)
            sess.run(net.probs, {net.input_x: ids, net.embedded: rows})


def _baseline() -> dict[str, Any]:
    """The bare TF process: TF imported *and* its runtime initialised, no model loaded.

    Also returns, under ``"import"``, the figures right after ``import tensorflow`` alone,
    so reports can show growth against both.
    """
    import tensorflow  # noqa: F401

    gc.collect()
    after_import = _measure()
    _initialise_tf_runtime()
    gc.collect()
    return {**_measure(), "import": after_import}


def _serve_case(spec: dict[str, Any]) -> dict[str, Any]:
    """N model versions loaded by textserve's own loader, then timed and evaluated.

    As in the server (``Registry``): free heap pages are trimmed after each load + warm-up
    (``malloc_trim``); lean cases set ``lean_tensorflow`` (and its fixed mmap threshold) before
    TensorFlow is imported.
    """
    from server import allocator

    if spec.get("lean"):
        allocator.lean_tensorflow()
    base = _baseline()
    from server.embeddings import EmbeddingStore
    from server.registry import warm_up
    from server.runtime.base import Runtime
    from server.runtime.loader import load_runtime

    shared = EmbeddingStore()
    stores: list[EmbeddingStore] = []
    runtimes: list[Runtime] = []
    private: dict[str, int] = {}
    t0 = time.monotonic()
    load_s: list[float] = []
    for m in spec["models"]:
        t1 = time.monotonic()
        store = shared
        emb_dir = m["embedding_dir"]
        if not spec["share"]:
            store = EmbeddingStore()
            if emb_dir is not None:
                # A private, anonymous copy for this model only (what the seed had per model).
                matrix = np.load(Path(emb_dir) / MATRIX_NPY, allow_pickle=False)
                store.register_array(matrix, name=f"private-{len(stores)}")
                private[str(len(stores))] = int(matrix.nbytes)
                del matrix
        if store not in stores:
            stores.append(store)
        rt = load_runtime(
            Path(m["dir"]),
            store=store,
            embedding_dir=None if emb_dir is None else Path(emb_dir),
            intra_op_threads=spec["intra_op_threads"],
            inter_op_threads=spec["inter_op_threads"],
        )
        warm_up(rt, spec["max_batch_size"])
        allocator.trim()
        runtimes.append(rt)
        load_s.append(time.monotonic() - t1)
    total_load_s = time.monotonic() - t0
    gc.collect()
    after_load = _measure()
    texts: list[str] = spec["texts"]
    first_ms = []
    for i, rt in enumerate(runtimes):
        t1 = time.perf_counter()
        rt.predict(rt.tokenizer.encode_batch([texts[i % len(texts)]]))
        first_ms.append(_ms(time.perf_counter() - t1))
    after_first = _measure()
    n = len(runtimes)

    def batch1(i: int) -> None:
        rt = runtimes[i % n]
        rt.predict(rt.tokenizer.encode_batch([texts[(i * 7 + 3) % len(texts)]]))

    def batch64(i: int) -> None:
        rt = runtimes[i % n]
        start = (i * 64) % max(1, len(texts) - 64)
        rt.predict(rt.tokenizer.encode_batch(texts[start : start + 64]))

    steady_b1 = _median_ms(batch1, spec["runs_batch1"])
    steady_b64 = _median_ms(batch64, spec["runs_batch64"])
    done, t1, i = 0, time.monotonic(), 0
    while time.monotonic() - t1 < spec["throughput_s"]:
        batch64(i)
        done += 64
        i += 1
    throughput = done / (time.monotonic() - t1)
    accuracy: dict[str, float] = {}
    for index, path in spec.get("eval", {}).items():
        rt = runtimes[int(index)]
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        correct = 0
        for start in range(0, len(data["texts"]), 64):
            probs = rt.predict(rt.tokenizer.encode_batch(data["texts"][start : start + 64]))
            pred = [rt.labels[j] for j in probs.argmax(axis=1)]
            correct += sum(
                p == g for p, g in zip(pred, data["gold"][start : start + 64], strict=True)
            )
        accuracy[rt.manifest.name] = correct / len(data["texts"])
    final = _measure()
    own = sum(rt.own_bytes for rt in runtimes)
    embedding_bytes = sum(s.nbytes for s in stores)
    for rt in runtimes:
        rt.close()
    return {
        "baseline": base,
        "after_load": after_load,
        "after_first": after_first,
        "final": final,
        "load_s": round(total_load_s, 4),
        "load_s_each": [round(s, 4) for s in load_s],
        "first_ms": first_ms,
        "steady_batch1_ms": steady_b1,
        "steady_batch64_ms": steady_b64,
        "throughput_texts_s": round(throughput, 1),
        "own_bytes": own,
        "embedding_bytes": embedding_bytes,
        "embeddings_held": sum(len(s) for s in stores),
        "accuracy": accuracy,
    }


def _seed_ids(rows: int, batch: int, seed: int) -> npt.NDArray[np.int32]:
    rng = np.random.default_rng(seed)
    return rng.integers(2, rows, size=(batch, SEED_TOKENS), dtype=np.int32)


def _raw_case(spec: dict[str, Any]) -> dict[str, Any]:
    """Plain TensorFlow (not textserve): the seed's frozen GraphDef vs a stripped checkpoint."""
    base = _baseline()
    import tensorflow as tf

    v1 = tf.compat.v1
    version_dir = Path(spec["dir"])
    manifest = load_model_manifest(version_dir)
    config = v1.ConfigProto(
        intra_op_parallelism_threads=spec["intra_op_threads"],
        inter_op_parallelism_threads=spec["inter_op_threads"],
    )
    t0 = time.monotonic()
    graph = tf.Graph()
    feed_name = "input_x:0"
    if spec["kind"] == "raw-frozen":
        graph_def = v1.GraphDef()
        graph_def.ParseFromString((version_dir / "model.pb").read_bytes())
        with graph.as_default():
            v1.import_graph_def(graph_def, name="")
        del graph_def
        session = v1.Session(graph=graph, config=config)
        rows = int(spec["rows"])
    else:
        from models.cnn import InGraphEmbedding, model_variable_names
        from server.graph import build_cnn

        assert manifest.architecture is not None
        emb_dir = Path(spec["embedding_dir"])
        rows = load_embedding_manifest(emb_dir).rows
        with graph.as_default():
            emb = InGraphEmbedding(rows, manifest.architecture.embedding_dim)
            build_cnn(manifest.architecture, lookup=emb)
            by_name = {v.op.name: v for v in v1.global_variables()}
            names = model_variable_names(manifest.architecture)
            saver = v1.train.Saver(var_list={n: by_name[n] for n in names})
        session = v1.Session(graph=graph, config=config)
        matrix = np.load(emb_dir / MATRIX_NPY, mmap_mode="r", allow_pickle=False)
        with graph.as_default():
            session.run(emb.variable.initializer, {emb.init: matrix})
            del matrix
            saver.restore(session, str(version_dir / "model.ckpt"))
    load_s = time.monotonic() - t0
    gc.collect()
    after_load = _measure()
    probs = graph.get_tensor_by_name("output/probs:0")
    t1 = time.perf_counter()
    session.run(probs, {feed_name: _seed_ids(rows, 1, 0)})
    first_s = time.perf_counter() - t1
    after_first = _measure()
    steady_b1 = _median_ms(lambda i: session.run(probs, {feed_name: _seed_ids(rows, 1, i)}), 30)
    steady_b64 = _median_ms(lambda i: session.run(probs, {feed_name: _seed_ids(rows, 64, i)}), 10)
    session.close()
    return {
        "baseline": base,
        "after_load": after_load,
        "after_first": after_first,
        "load_s": round(load_s, 4),
        "first_ms": [_ms(first_s)],
        "steady_batch1_ms": steady_b1,
        "steady_batch64_ms": steady_b64,
    }


def _random_weights(spec: CnnSpec, seed: int) -> dict[str, npt.NDArray[np.float32]]:
    from models.cnn import model_variable_shapes

    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in model_variable_shapes(spec).items():
        if name.endswith("/b"):
            out[name] = np.full(shape, 0.1, dtype=np.float32)
        else:
            fan = int(np.prod(shape[:-1])) + shape[-1]
            limit = np.sqrt(6.0 / fan)
            out[name] = rng.uniform(-limit, limit, size=shape).astype(np.float32)
    return out


def _build_seed_case(spec: dict[str, Any]) -> dict[str, Any]:
    """Write the seed-scale repository with the toolchain's own generator and exporters."""
    from models import compress
    from models.embeddings import write_generated
    from models.export import export, export_checkpoint
    from models.train import TrainConfig, TrainedModel, Trainer

    repo = Path(spec["repo"])
    emb = write_generated(
        repo / EMBEDDINGS_DIR / SEED_EMBEDDING, SEED_EMBEDDING, rows=spec["rows"], dim=300
    )
    labels = tuple(f"label{i}" for i in range(SEED_LABELS))
    tokenizer = TokenizerSpec(max_len=100, min_len=3)
    files: dict[str, int] = {}
    for i in range(SEED_MODELS):
        model = TrainedModel(SEED_SPEC, tokenizer, labels, _random_weights(SEED_SPEC, i), emb)
        name = f"seed-{i:02d}"
        ex = export(model, ModelFormat.STRIPPED, repo / name / "1", name, 1)
        if i == 0:
            files["stripped checkpoint"] = ex.bytes
            sc = export(model, ModelFormat.FROZEN_SELFCONTAINED, repo / name / "2", name, 2)
            files["frozen GraphDef, embedding inside (the seed's)"] = sc.bytes
            full_dir = repo / "full-checkpoint" / name / "1"
            full_dir.mkdir(parents=True)
            config = TrainConfig(num_filters=128, trainable_embedding=True, threads=2)
            with Trainer(emb, labels, config) as trainer:
                full = export_checkpoint(trainer, model, full_dir, name, 1)
            files["full checkpoint (trainable embedding, Adam slots, meta graph)"] = full.bytes
    pruned = []
    for sparsity in PRUNE_SPARSITIES:
        result = compress.prune_model(repo, "seed-00", sparsity, version=1)
        pruned.append(result.record())
    return {"files": files, "pruned": pruned, "embedding_sha256": emb.manifest.sha256}


def worker_main() -> int:
    spec = json.loads(sys.stdin.read())
    kind = spec["kind"]
    if kind == "serve":
        result = _serve_case(spec)
    elif kind in ("raw-frozen", "raw-stripped"):
        result = _raw_case(spec)
    elif kind == "build-seed":
        result = _build_seed_case(spec)
    else:
        raise UsageError(f"unknown worker case {kind!r}")
    print(json.dumps(result))
    return 0


# =============================================================================================
# Parent side


@dataclass
class Case:
    scale: str
    strategy: str
    n: int
    spec: dict[str, Any]
    title: str
    result: dict[str, Any] | None = None
    error: str | None = None
    seconds: float = 0.0

    def record(self) -> dict[str, Any]:
        return {
            "scale": self.scale,
            "strategy": self.strategy,
            "n": self.n,
            "title": self.title,
            "kind": self.spec["kind"],
            "models": [m["dir"] for m in self.spec.get("models", [])],
            "result": self.result,
            "error": self.error,
            "seconds": round(self.seconds, 2),
        }


def run_worker(spec: dict[str, Any], timeout: float = CASE_TIMEOUT_S) -> dict[str, Any]:
    """Run one case in a fresh interpreter; its last stdout line is the JSON result."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONUNBUFFERED="1")
    proc = subprocess.run(
        [sys.executable, "-m", "models.commands.memory_report", "--worker"],
        input=json.dumps(spec),
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        check=False,
    )
    if proc.returncode != 0:
        tail = [line for line in proc.stderr.strip().splitlines() if line.strip()][-3:]
        raise ArtifactError(f"worker exited {proc.returncode}: {' | '.join(tail)}")
    lines = proc.stdout.strip().splitlines()
    if not lines:
        raise ArtifactError("worker printed no result")
    result: dict[str, Any] = json.loads(lines[-1])
    return result


@dataclass
class Options:
    repo: Path | None
    out: Path
    work: Path
    scales: tuple[str, ...]
    counts: tuple[int, ...]
    strategies: tuple[str, ...]
    vocab_keep: int
    eval_limit: int
    seed_rows: int
    runs_batch1: int = 40
    runs_batch64: int = 10
    throughput_s: float = 1.0
    intra_op_threads: int = 2
    inter_op_threads: int = 1
    max_batch_size: int = 64
    notes: list[str] = field(default_factory=list)


def _serve_spec(
    opts: Options, models: list[dict[str, Any]], share: bool, texts: list[str]
) -> dict[str, Any]:
    return {
        "kind": "serve",
        "models": models,
        "share": share,
        "texts": texts,
        "intra_op_threads": opts.intra_op_threads,
        "inter_op_threads": opts.inter_op_threads,
        "max_batch_size": opts.max_batch_size,
        "runs_batch1": opts.runs_batch1,
        "runs_batch64": opts.runs_batch64,
        "throughput_s": opts.throughput_s,
    }


def _embedding_path(repo: Path, name: str) -> Path:
    config = load_repository_config(repo)
    entry = config.embedding(name)
    return resolve_inside(repo, entry.path if entry is not None else f"{EMBEDDINGS_DIR}/{name}")


def _demo_versions(repo: Path) -> list[tuple[str, Path, str | None]]:
    """(model, version dir, embedding name) for every served version, interleaved by model."""
    config = load_repository_config(repo)
    per_model: list[list[tuple[str, Path, str | None]]] = []
    for mc in config.models:
        base = resolve_inside(repo, mc.base_path)
        found = []
        for v in select_versions(list_versions(base), mc.version_policy):
            manifest = load_model_manifest(base / str(v))
            if manifest.format not in (ModelFormat.STRIPPED, ModelFormat.FROZEN):
                continue
            emb = mc.embedding or (manifest.embedding.name if manifest.embedding else None)
            found.append((mc.name, base / str(v), emb))
        if found:
            per_model.append(found)
    out: list[tuple[str, Path, str | None]] = []
    for i in range(max((len(f) for f in per_model), default=0)):
        out.extend(f[i] for f in per_model if i < len(f))
    if not out:
        raise ArtifactError(f"{repo}: no stripped or frozen model versions to measure")
    return out


def _eval_files(opts: Options, names: set[str]) -> tuple[dict[str, Path], list[str], list[str]]:
    """Test-split files for the demo models we know; training texts (vocab); latency texts."""
    from models.data import load_wordnet
    from models.demo import DEMO_MODELS

    files: dict[str, Path] = {}
    train: list[str] = []
    pool: list[str] = []
    for name in sorted(names & DEMO_MODELS.keys()):
        ds = load_wordnet(DEMO_MODELS[name])
        test = ds.test.head(opts.eval_limit)
        path = opts.work / f"eval-{name}.json"
        gold = [ds.labels[int(y)] for y in test.y]
        path.write_text(json.dumps({"texts": list(test.texts), "gold": gold}), encoding="utf-8")
        files[name] = path
        train.extend(ds.train.texts)
        pool.extend(test.texts[:200])
    return files, train, pool


def _copy_embedding(src: Path, dst_repo: Path) -> str:
    manifest = load_embedding_manifest(src)
    dst = dst_repo / EMBEDDINGS_DIR / manifest.name
    if not dst.exists():
        shutil.copytree(src, dst)
    return manifest.name


def demo_cases(opts: Options) -> list[Case]:
    from models import compress

    assert opts.repo is not None
    versions = _demo_versions(opts.repo)
    work_repo = opts.work / "demo-embeddings"
    names = {name for name, _, _ in versions}
    eval_files, train_texts, pool = _eval_files(opts, names)
    if not pool:
        pool = [f"text number {i} for timing" for i in range(256)]
        opts.notes.append("demo: no known test split for these models; accuracy not measured")
    # strategy → embedding name → directory
    dirs: dict[str, dict[str, Path]] = {s: {} for s in opts.strategies}
    for emb_name in sorted({e for _, _, e in versions if e is not None}):
        src = _embedding_path(opts.repo, emb_name)
        local = _copy_embedding(src, work_repo)
        for strategy in opts.strategies:
            if strategy in ("float32", "float32-private"):
                dirs[strategy][emb_name] = src
            elif strategy == "float16":
                dirs[strategy][emb_name] = compress.to_float16(
                    work_repo, local, register=False, overwrite=True
                ).path
            elif strategy == "int8":
                dirs[strategy][emb_name] = compress.to_int8(
                    work_repo, local, register=False, overwrite=True
                ).path
            elif strategy == "vocab":
                if not train_texts:
                    continue
                result = compress.prune_vocabulary(
                    work_repo, local, train_texts, opts.vocab_keep, register=False, overwrite=True
                )
                opts.notes.append(
                    f"demo vocab: top {opts.vocab_keep} training tokens of {emb_name}: "
                    f"{result.manifest.rows} rows of {result.source.rows}, training-token "
                    f"coverage {result.extra['coverage_before']:.4f} → "
                    f"{result.extra['coverage_after']:.4f}"
                )
                dirs[strategy][emb_name] = result.path
    eval_n = next((n for n in sorted(opts.counts) if n >= len(names)), max(opts.counts))
    cases = []
    for strategy in opts.strategies:
        if not dirs[strategy]:
            continue
        _, share, title = STRATEGIES[strategy]
        for n in opts.counts:
            chosen = [versions[i % len(versions)] for i in range(n)]
            models = [
                {"dir": str(d), "embedding_dir": None if e is None else str(dirs[strategy][e])}
                for _, d, e in chosen
            ]
            spec = _serve_spec(opts, models, share, pool)
            if n == eval_n:
                seen: set[str] = set()
                spec["eval"] = {}
                for i, (name, _, _) in enumerate(chosen):
                    if name in eval_files and name not in seen:
                        seen.add(name)
                        spec["eval"][str(i)] = str(eval_files[name])
            cases.append(Case("demo", strategy, n, spec, title))
    return cases


def _seed_texts(opts: Options, count: int = 256) -> list[str]:
    from models.embeddings import generated_words

    words = generated_words(opts.seed_rows)
    rng = np.random.default_rng(1)
    return [
        " ".join(words[j] for j in rng.integers(0, len(words), size=SEED_TOKENS))
        for _ in range(count)
    ]


def seed_cases(opts: Options, seed_repo: Path) -> list[Case]:
    from models import compress

    src = seed_repo / EMBEDDINGS_DIR / SEED_EMBEDDING
    dirs = {"float32": src, "float32-private": src, "float32-lean": src}
    if "float16" in opts.strategies:
        dirs["float16"] = compress.to_float16(
            seed_repo, SEED_EMBEDDING, register=False, overwrite=True
        ).path
    if {"int8", "int8-lean"} & set(opts.strategies):
        dirs["int8"] = dirs["int8-lean"] = compress.to_int8(
            seed_repo, SEED_EMBEDDING, register=False, overwrite=True
        ).path
    texts = _seed_texts(opts)
    cases = []
    for strategy in (s for s in SEED_STRATEGIES if s in opts.strategies):
        _, share, title = STRATEGIES[strategy]
        for n in opts.counts:
            models = [
                {
                    "dir": str(seed_repo / f"seed-{i % SEED_MODELS:02d}" / "1"),
                    "embedding_dir": str(dirs[strategy]),
                }
                for i in range(n)
            ]
            spec = _serve_spec(opts, models, share, texts)
            spec["lean"] = strategy in LEAN_STRATEGIES
            cases.append(Case("seed", strategy, n, spec, title))
    threads = {"intra_op_threads": opts.intra_op_threads, "inter_op_threads": opts.inter_op_threads}
    sc = seed_repo / "seed-00" / "2"
    cases.append(
        Case(
            "seed-load",
            "tf-frozen",
            1,
            {"kind": "raw-frozen", "dir": str(sc), "rows": opts.seed_rows, **threads},
            "plain TF: frozen GraphDef with the embedding inside (the seed's way)",
        )
    )
    cases.append(
        Case(
            "seed-load",
            "tf-stripped",
            1,
            {
                "kind": "raw-stripped",
                "dir": str(seed_repo / "seed-00" / "1"),
                "embedding_dir": str(src),
                **threads,
            },
            "plain TF: stripped checkpoint + embedding variable fed from the .npy",
        )
    )
    cases.append(
        Case(
            "seed-load",
            "textserve-frozen",
            1,
            _serve_spec(opts, [{"dir": str(sc), "embedding_dir": None}], True, texts),
            "textserve: the same frozen GraphDef (embedding cut out, shared by hash)",
        )
    )
    cases.append(
        Case(
            "seed-load",
            "textserve-stripped",
            1,
            _serve_spec(
                opts,
                [{"dir": str(seed_repo / "seed-00" / "1"), "embedding_dir": str(src)}],
                True,
                texts,
            ),
            "textserve: the same stripped checkpoint (embedding mmap'd from the .npy)",
        )
    )
    return cases


# ---------------------------------------------------------------------------------------------
# Summaries, targets, output


def growth(result: dict[str, Any], point: str, kind: str) -> int:
    return int(result[point][kind]) - int(result["baseline"][kind])


def growth_since_import(result: dict[str, Any], point: str, kind: str) -> int | None:
    """Growth above the process right after ``import tensorflow`` (before TF's runtime init)."""
    base = result["baseline"].get("import")
    return None if base is None else int(result[point][kind]) - int(base[kind])


def _fmt_mib(n: float | None) -> str:
    return "–" if n is None else f"{n / MiB:,.1f}"


def summarize(cases: Sequence[Case]) -> list[dict[str, Any]]:
    rows = []
    for c in cases:
        r = c.result
        if r is None or "after_first" not in r:
            continue
        rows.append(
            {
                "scale": c.scale,
                "strategy": c.strategy,
                "n": c.n,
                "rss_load": growth(r, "after_load", "rss"),
                "uss_load": growth(r, "after_load", "uss"),
                "rss_first": growth(r, "after_first", "rss"),
                "rss_first_since_import": growth_since_import(r, "after_first", "rss"),
                "uss_first": growth(r, "after_first", "uss"),
                "anon_first": growth(r, "after_first", "anon"),
                "file_first": growth(r, "after_first", "file"),
                "tensor_bytes": r.get("own_bytes", 0) + r.get("embedding_bytes", 0),
                "own_bytes": r.get("own_bytes", 0),
                "embedding_bytes": r.get("embedding_bytes", 0),
                "load_s": r["load_s"],
                "first_ms": statistics.median(r["first_ms"]),
                "first_ms_all": list(r["first_ms"]),
                "first_ms_max": max(r["first_ms"]),
                "steady_batch1_ms": r["steady_batch1_ms"],
                "steady_batch64_ms": r["steady_batch64_ms"],
                "throughput_texts_s": r.get("throughput_texts_s"),
                "accuracy": r.get("accuracy", {}),
                "bare_tf": r["baseline"],
            }
        )
    return rows


def _find(
    rows: Sequence[dict[str, Any]], scale: str, strategy: str, n: int
) -> dict[str, Any] | None:
    return next(
        (r for r in rows if (r["scale"], r["strategy"], r["n"]) == (scale, strategy, n)), None
    )


def targets(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The report's targets, each with the measured figure and pass/fail (None: not measured)."""
    out: list[dict[str, Any]] = []

    def add(name: str, measured: str, ok: bool | None) -> None:
        out.append({"target": name, "measured": measured, "ok": ok})

    for strategy in ("float32", "float32-lean"):
        shared = _find(rows, "seed", strategy, 10)
        if shared is None:
            continue
        bound = 1.15 * (shared["embedding_bytes"] + shared["own_bytes"])
        add(
            f"seed scale: 10 models over one shared float32 embedding ≤ 1.15 × (one embedding + "
            f"ten models' own weights) above bare TF (RSS after first request; {strategy})",
            f"{_fmt_mib(shared['rss_first'])} MiB vs bound {_fmt_mib(bound)} MiB "
            f"({_fmt_mib(shared['rss_first_since_import'])} MiB above `import tensorflow` alone)",
            shared["rss_first"] <= bound,
        )
    if _find(rows, "seed", "float32", 10) is None:
        add(
            "seed scale: 10 models, shared float32 ≤ 1.15 × (embedding + weights)",
            "not measured",
            None,
        )
    private = _find(rows, "seed", "float32-private", 10)
    if private is not None:
        one = private["embedding_bytes"] / 10
        add(
            "seed scale, without sharing: ≥ 10 embeddings (RSS after first request)",
            f"{_fmt_mib(private['rss_first'])} MiB vs 10 × {_fmt_mib(one)} MiB",
            private["rss_first"] >= 10 * one,
        )
    else:
        add("seed scale, without sharing: ≥ 10 embeddings", "not measured", None)
    for strategy in ("int8", "int8-lean"):
        int8 = _find(rows, "seed", strategy, 10)
        if int8 is None:
            continue
        add(
            f"seed scale: 10 models over a shared int8 embedding ≤ 80 MiB above bare TF "
            f"({strategy})",
            f"{_fmt_mib(int8['rss_first'])} MiB "
            f"({_fmt_mib(int8['rss_first_since_import'])} MiB above `import tensorflow` alone)",
            int8["rss_first"] <= 80 * MiB,
        )
    if _find(rows, "seed", "int8", 10) is None:
        add("seed scale: int8 shared ≤ 80 MiB above bare TF", "not measured", None)
    demo_ref = [
        r for r in rows if r["scale"] == "demo" and r["strategy"] == "float32" and r["accuracy"]
    ]
    for strategy in ("float16", "int8"):
        if not demo_ref:
            add(f"demo: {strategy} accuracy drop ≤ 0.5 point", "not measured", None)
            continue
        ref = demo_ref[0]
        other = _find(rows, "demo", strategy, ref["n"])
        if other is None or not other["accuracy"]:
            add(f"demo: {strategy} accuracy drop ≤ 0.5 point", "not measured", None)
            continue
        drops = {
            m: 100 * (ref["accuracy"][m] - other["accuracy"].get(m, 0.0)) for m in ref["accuracy"]
        }
        worst = max(drops.values())
        add(
            f"demo: {strategy} accuracy drop ≤ 0.5 point (each model, test split)",
            "drop "
            + ", ".join(f"{m} {d:+.2f}" for m, d in sorted(drops.items()))
            + " points (negative: better than float32)",
            worst <= 0.5,
        )
    for scale in ("demo", "seed"):
        for strategy in STRATEGIES:
            mine = [r for r in rows if r["scale"] == scale and r["strategy"] == strategy]
            if not mine:
                continue
            # One first request per loaded model is one noisy sample: pool every load of the
            # strategy (N = 1 + 3 + 10 models) and compare medians.
            first = statistics.median(ms for r in mine for ms in r["first_ms_all"])
            steady = statistics.median(r["steady_batch1_ms"] for r in mine)
            worst = max(ms for r in mine for ms in r["first_ms_all"])
            add(
                f"{scale} {strategy}: first request ≤ 3 × steady (batch 1; medians over "
                f"{sum(len(r['first_ms_all']) for r in mine)} model loads)",
                f"{first:.2f} ms vs {steady:.2f} ms = {first / steady:.2f}× (slowest first "
                f"request {worst:.1f} ms)",
                first <= 3 * steady,
            )
    return out


def per_extra_model(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Memory each model beyond the first adds, per scale and strategy."""
    out = []
    for scale in ("demo", "seed"):
        for strategy in STRATEGIES:
            mine = sorted(
                (r for r in rows if r["scale"] == scale and r["strategy"] == strategy),
                key=lambda r: r["n"],
            )
            if len(mine) < 2 or mine[0]["n"] != 1:
                continue
            one, big = mine[0], mine[-1]
            k = big["n"] - 1
            out.append(
                {
                    "scale": scale,
                    "strategy": strategy,
                    "n": big["n"],
                    "rss": (big["rss_first"] - one["rss_first"]) / k,
                    "anon": (big["anon_first"] - one["anon_first"]) / k,
                    "own": (big["own_bytes"] - one["own_bytes"]) / k,
                }
            )
    return out


def _markdown(
    opts: Options,
    cases: Sequence[Case],
    rows: Sequence[dict[str, Any]],
    goals: Sequence[dict[str, Any]],
    seed_build: dict[str, Any] | None,
    argv: Sequence[str],
) -> str:
    lines = [
        "# textserve memory report",
        "",
        f"Command: `textserve memory-report {' '.join(argv)}`  ",
        f"Machine: {os.cpu_count()} CPUs; TensorFlow threads intra {opts.intra_op_threads} / "
        f"inter {opts.inter_op_threads}. Every case ran in a fresh process; memory is the growth "
        "above that process's own bare TF process: TensorFlow imported and its runtime "
        "initialised by one run of a throw-away 2-filter CNN (the one-off session runtime, "
        "thread pools, oneDNN kernels and library pages every TF server pays before its first "
        "model), no model loaded. The targets also give the growth above `import tensorflow` "
        "alone. See docs/memory/README.md for what each figure means.",
        "",
        "Columns: RSS Δ = resident memory above bare TF; anon Δ = anonymous pages (heap: TF "
        "tensors, Python objects, private copies); file Δ = file-backed pages (mmap'd "
        "embeddings); USS Δ = private pages (noisy on a shared machine: a library page turns "
        "private when other processes unmap it); tensors = exact bytes of the models' own "
        "weights + each distinct embedding once; 1st req = median over the set's models of "
        "each model's first request (batch 1); b1/b64 = steady medians at batch 1 / 64, "
        "tokenization included; texts/s = batch-64 throughput cycling over the models.",
        "",
        "## Targets",
        "",
        "| target | measured | result |",
        "|---|---|---|",
    ]
    for g in goals:
        verdict = "not measured" if g["ok"] is None else ("PASS" if g["ok"] else "FAIL")
        lines.append(f"| {g['target']} | {g['measured']} | {verdict} |")
    for scale, heading in (("demo", "Demo set"), ("seed", "Seed scale (220k x 300)")):
        mine = [r for r in rows if r["scale"] == scale]
        if not mine:
            continue
        bare = mine[0]["bare_tf"]
        lines += [
            "",
            f"## {heading}",
            "",
            f"Bare TF process (one case's baseline): RSS {_fmt_mib(bare['rss'])} MiB, "
            f"USS {_fmt_mib(bare['uss'])} MiB"
            + (
                f" (right after `import tensorflow`: RSS {_fmt_mib(bare['import']['rss'])} MiB)."
                if "import" in bare
                else "."
            ),
            "",
            "| strategy | N | RSS Δ load (MiB) | RSS Δ 1st req | anon Δ | file Δ | USS Δ | "
            "tensors (MiB) | load s | 1st req ms | b1 ms | b64 ms | texts/s | accuracy |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in mine:
            acc = ", ".join(f"{m} {a:.4f}" for m, a in sorted(r["accuracy"].items())) or "–"
            lines.append(
                f"| {r['strategy']} | {r['n']} | {_fmt_mib(r['rss_load'])} | "
                f"{_fmt_mib(r['rss_first'])} | {_fmt_mib(r['anon_first'])} | "
                f"{_fmt_mib(r['file_first'])} | {_fmt_mib(r['uss_first'])} | "
                f"{_fmt_mib(r['tensor_bytes'])} | {r['load_s']:.2f} | "
                f"{r['first_ms']:.2f} | {r['steady_batch1_ms']:.2f} | "
                f"{r['steady_batch64_ms']:.2f} | {r['throughput_texts_s'] or 0:,.0f} | {acc} |"
            )
    marginal = per_extra_model(rows)
    if marginal:
        lines += [
            "",
            "## Cost of each extra model",
            "",
            "(Δ at the largest N − Δ at N = 1) / (N − 1), after the first request, next to the "
            "model's own weights. Anything above the weights is per-session state outside the "
            "tensors (graph, kernels, tokenizer vocabulary, buffers).",
            "",
            "| scale | strategy | RSS MiB / model | anon MiB / model | own weights MiB / model |",
            "|---|---|---|---|---|",
        ]
        for m in marginal:
            lines.append(
                f"| {m['scale']} | {m['strategy']} | {_fmt_mib(m['rss'])} | "
                f"{_fmt_mib(m['anon'])} | {_fmt_mib(m['own'])} |"
            )
    loads = [c for c in cases if c.scale == "seed-load"]
    if loads:
        lines += [
            "",
            "## Seed scale: loading one model, plain TensorFlow vs textserve",
            "",
            "Plain TF rows: load = read + import/restore, then the first `session.run` (batch "
            "1, 50 tokens). textserve rows: load = `load_runtime` + the registry's warm-up, "
            "then the first request; the embedding is the artifact's (stripped) or the one cut "
            "out of the graph (frozen).",
            "",
            "| how | RSS Δ load (MiB) | RSS Δ 1st run | load s | 1st run ms | b1 ms | b64 ms |",
            "|---|---|---|---|---|---|---|",
        ]
        for c in loads:
            if c.result is None:
                lines.append(f"| {c.title} | failed: {c.error} | | | | | |")
                continue
            r = c.result
            lines.append(
                f"| {c.title} | {_fmt_mib(growth(r, 'after_load', 'rss'))} | "
                f"{_fmt_mib(growth(r, 'after_first', 'rss'))} | {r['load_s']:.2f} | "
                f"{r['first_ms'][0]:.1f} | {r['steady_batch1_ms']:.2f} | "
                f"{r['steady_batch64_ms']:.2f} |"
            )
    if seed_build is not None:
        lines += [
            "",
            "## Seed scale: files on disk",
            "",
            "| artifact | bytes | MiB |",
            "|---|---|---|",
        ]
        for name, size in seed_build["files"].items():
            lines.append(f"| {name} | {size:,} | {_fmt_mib(size)} |")
        lines += [
            "",
            "Magnitude pruning of the stripped checkpoint (conv + dense kernels, per layer): "
            "the raw size does not change; only compressed copies shrink.",
            "",
            "| sparsity | raw bytes | gzip bytes | zip bytes | source gzip |",
            "|---|---|---|---|---|",
        ]
        for p in seed_build["pruned"]:
            d, s = p["disk_bytes"], p["source_disk_bytes"]
            lines.append(
                f"| {p['sparsity']:.3f} | {d['raw']:,} | {d['gzip']:,} | {d['zip']:,} | "
                f"{s['gzip']:,} |"
            )
    failed = [c for c in cases if c.error]
    if failed or opts.notes:
        lines += ["", "## Notes", ""]
        lines += [f"- {n}" for n in opts.notes]
        lines += [f"- {c.scale} {c.strategy} N={c.n} failed: {c.error}" for c in failed]
    lines += ["", "![memory vs number of models](memory_vs_models.png)", ""]
    return "\n".join(lines)


def plot(rows: Sequence[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scales = [s for s in ("demo", "seed") if any(r["scale"] == s for r in rows)]
    fig, axes = plt.subplots(
        1, max(1, len(scales)), figsize=(6 * max(1, len(scales)), 4.5), squeeze=False
    )
    for ax, scale in zip(axes[0], scales, strict=False):
        for strategy in STRATEGIES:
            mine = sorted(
                (r for r in rows if r["scale"] == scale and r["strategy"] == strategy),
                key=lambda r: r["n"],
            )
            if mine:
                ax.plot(
                    [r["n"] for r in mine],
                    [r["rss_first"] / MiB for r in mine],
                    marker="o",
                    label=strategy,
                )
        ax.set_title(f"{scale}: RSS above bare TF after the first request")
        ax.set_xlabel("models loaded")
        ax.set_ylabel("MiB")
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _run_cases(cases: list[Case], describe: Callable[[Case], str]) -> Iterator[Case]:
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
    ) as progress:
        task = progress.add_task("memory report", total=len(cases))
        for case in cases:
            progress.update(task, description=describe(case))
            t0 = time.monotonic()
            try:
                case.result = run_worker(case.spec)
            except (ArtifactError, subprocess.TimeoutExpired) as exc:
                case.error = (
                    exc.message
                    if isinstance(exc, ArtifactError)
                    else f"timed out after {exc.timeout} s"
                )
            case.seconds = time.monotonic() - t0
            progress.advance(task)
            yield case


SEED_BUILD_JSON = "seed-build.json"


def _seed_repository(seed_repo: Path, rows: int) -> dict[str, Any]:
    """Build the seed-scale repository in a worker, or reuse one built with the same rows."""
    marker = seed_repo / SEED_BUILD_JSON
    if marker.is_file():
        saved: dict[str, Any] = json.loads(marker.read_text(encoding="utf-8"))
        if saved.get("rows") == rows:
            print(f"memory-report: reusing {seed_repo}", file=sys.stderr)
            return saved
    if seed_repo.exists():
        shutil.rmtree(seed_repo)
    print(f"memory-report: writing the seed-scale repository under {seed_repo} …", file=sys.stderr)
    built = run_worker({"kind": "build-seed", "repo": str(seed_repo), "rows": rows})
    built["rows"] = rows
    marker.write_text(json.dumps(built), encoding="utf-8")
    return built


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--repo", type=Path, help="demo model repository (textserve build-demo)")
    parser.add_argument("--out", type=Path, required=True, help="report directory")
    parser.add_argument("--work", type=Path, help="scratch directory (default: a temporary one)")
    parser.add_argument("--scales", nargs="+", choices=("demo", "seed"), default=["demo", "seed"])
    parser.add_argument("--counts", nargs="+", type=int, default=[1, 3, 10], help="models per set")
    parser.add_argument(
        "--strategies", nargs="+", choices=tuple(STRATEGIES), default=list(STRATEGIES)
    )
    parser.add_argument("--vocab-keep", type=int, default=20_000, help="demo vocabulary pruning")
    parser.add_argument("--eval-limit", type=int, default=2000, help="test texts per demo model")
    parser.add_argument(
        "--seed-rows", type=int, default=220_000, help="rows of the generated seed embedding"
    )
    parser.add_argument("--runs", type=int, default=40, help="steady batch-1 runs per case")
    parser.add_argument(
        "--throughput-s", type=float, default=1.0, help="seconds of batch-64 throughput per case"
    )


def run(args: argparse.Namespace) -> int:
    if "demo" in args.scales and args.repo is None:
        raise UsageError("--repo is required for the demo scale (or use --scales seed)")
    if args.repo is not None and not (args.repo / "models.yaml").is_file():
        raise UsageError(f"{args.repo}: no models.yaml (build one with textserve build-demo)")
    if any(n < 1 for n in args.counts):
        raise UsageError("--counts must be positive")
    args.out.mkdir(parents=True, exist_ok=True)
    scratch = None
    if args.work is None:
        scratch = tempfile.mkdtemp(prefix="textserve-memory-")
        work = Path(scratch)
    else:
        work = args.work
        work.mkdir(parents=True, exist_ok=True)
    opts = Options(
        repo=args.repo,
        out=args.out,
        work=work,
        scales=tuple(args.scales),
        counts=tuple(sorted(set(args.counts))),
        strategies=tuple(args.strategies),
        vocab_keep=args.vocab_keep,
        eval_limit=args.eval_limit,
        seed_rows=args.seed_rows,
        runs_batch1=args.runs,
        runs_batch64=max(5, args.runs // 4),
        throughput_s=args.throughput_s,
    )
    try:
        cases: list[Case] = []
        seed_build: dict[str, Any] | None = None
        if "demo" in opts.scales:
            cases += demo_cases(opts)
        if "seed" in opts.scales:
            seed_repo = work / "seed-repo"
            seed_build = _seed_repository(seed_repo, opts.seed_rows)
            cases += seed_cases(opts, seed_repo)
        done = list(_run_cases(cases, lambda c: f"{c.scale} {c.strategy} N={c.n}"))
        rows = summarize(done)
        goals = targets(rows)
        argv = sys.argv[2:] if len(sys.argv) > 2 else []
        report = {
            "options": {
                "repo": str(opts.repo) if opts.repo else None,
                "scales": opts.scales,
                "counts": opts.counts,
                "strategies": opts.strategies,
                "seed_rows": opts.seed_rows,
            },
            "cases": [c.record() for c in done],
            "summary": rows,
            "per_extra_model": per_extra_model(rows),
            "targets": goals,
            "seed_build": seed_build,
            "notes": opts.notes,
        }
        (opts.out / "report.json").write_text(json.dumps(report, indent=2), encoding="utf-8")
        (opts.out / "report.md").write_text(
            _markdown(opts, done, rows, goals, seed_build, argv), encoding="utf-8"
        )
        if rows:
            plot(rows, opts.out / "memory_vs_models.png")
        print(f"memory-report: wrote {opts.out / 'report.md'}", file=sys.stderr)
        failed = [c for c in done if c.error]
        return 1 if failed else 0
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    if sys.argv[1:] == ["--worker"]:
        sys.exit(worker_main())
    sys.exit("usage: textserve memory-report … (this module's --worker mode is internal)")
