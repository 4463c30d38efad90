"""One benchmark run: per model, in-process ceiling, textserve and the naive server side by side.

For each model both servers are started first (each its own process, pinned to the server
CPUs) and polled until they answer; then, with both idle, the in-process ceilings are measured
in this process; then wrk drives each server in turn through every (request kind, concurrency)
point. Nothing else of ours runs while a point is measured.
"""

from __future__ import annotations

import gc
import json
import os
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import batcher_effects, ceiling
from bench.models import QUICK, SEED, BenchModel, build_random_repo, demo_model
from bench.servers import Server, start_naive, start_textserve, stop, wait_ready
from bench.texts import gloss_texts, joined_texts, mean_tokens, write_bodies
from bench.wrk import run_wrk

Log = Callable[[str], None]


@dataclass
class Options:
    out: Path
    work: Path
    models: Sequence[str]
    duration_s: float
    concurrency: Sequence[int]
    quick: bool
    demo_repo: Path | None
    server_cpus: Sequence[int]
    batch_texts: int = 64
    ablation: bool = True
    effects: bool = True
    command: str = ""
    log: Log = field(default=print)


def _model_texts(key: str, glosses: Sequence[str], quick: bool) -> list[str]:
    if key == "seed":
        return joined_texts(glosses, 50, 600 if quick else 4000)
    return list(glosses[: 3000 if quick else 20000])


def _build(key: str, opts: Options, texts: Sequence[str]) -> BenchModel:
    if key == "quick":
        return build_random_repo(opts.work / "repo-quick", QUICK, texts)
    if key == "seed":
        return build_random_repo(opts.work / "repo-seed", SEED, texts)
    if key == "demo":
        return demo_model(opts.demo_repo, opts.work, texts)
    raise ValueError(f"unknown model {key!r} (quick, demo, seed)")


def _drive(
    server: Server,
    bodies: dict[str, Path],
    opts: Options,
    kinds: Sequence[str],
    concurrency: Sequence[int],
) -> list[dict[str, Any]]:
    runs = []
    for kind in kinds:
        per_request = opts.batch_texts if kind == "batch" else 1
        for c in concurrency:
            cpu0 = server.cpu_seconds()
            r = run_wrk(
                server.url,
                bodies[kind],
                connections=c,
                duration_s=opts.duration_s,
                texts_per_request=per_request,
            )
            cpu = server.cpu_seconds() - cpu0
            row = {"kind": kind, **r.as_dict()}
            row["server_cpu_s"] = cpu
            row["server_cores"] = cpu / r.duration_s
            row["wrk_cores"] = r.wrk_cpu_s / r.duration_s
            runs.append(row)
            opts.log(
                f"  {server.kind:9s} {kind:6s} c={c:<3d} {r.texts_per_s:10,.0f} texts/s  "
                f"p50 {r.p50_ms:7.1f} ms  p99 {r.p99_ms:7.1f} ms  non-2xx {r.non_2xx}  "
                f"server {row['server_cores']:.2f} cores, wrk {row['wrk_cores']:.2f}"
            )
    return runs


def _warm(server: Server, bodies: dict[str, Path], opts: Options) -> None:
    run_wrk(server.url, bodies["batch"], connections=4, duration_s=1, texts_per_request=1)
    run_wrk(server.url, bodies["single"], connections=8, duration_s=1, texts_per_request=1)


def bench_model(key: str, glosses: Sequence[str], opts: Options) -> dict[str, Any]:
    log = opts.log
    texts = _model_texts(key, glosses, opts.quick)
    log(f"[{key}] building / resolving the model")
    model = _build(key, opts, texts)
    log(f"[{key}] {model.title}: {model.version_dir}")
    workdir = opts.work / f"run-{key}"
    bodies = {
        "batch": write_bodies(workdir / "bodies-batch.jsonl", texts, opts.batch_texts, 200),
        "single": write_bodies(workdir / "bodies-single.jsonl", texts, 1, 2000),
    }
    probe = bodies["single"].read_text(encoding="utf-8").splitlines()[0].encode()
    cpus = opts.server_cpus

    servers: dict[str, Server] = {}
    started = time.monotonic()
    try:
        servers["textserve"] = start_textserve(model, workdir / "textserve.log", cpus)
        servers["naive"] = start_naive(model, workdir / "naive.log", cpus)
        ready = {name: wait_ready(s, probe) for name, s in servers.items()}
        log(f"[{key}] servers ready in {time.monotonic() - started:.1f} s")

        log(f"[{key}] in-process ceiling")
        ceil_s = max(1.0, opts.duration_s / 2)
        runtime = ceiling.load_server_runtime(model)
        try:
            ceil: dict[str, Any] = {
                "runtime": ceiling.runtime_rate(runtime, texts, ceil_s).as_dict(),
                "tokenize": ceiling.tokenize_rate(runtime.tokenizer, texts, ceil_s).as_dict(),
            }
            effects: dict[str, Any] = {}
            if opts.effects:
                mixed = _mixed_lengths(glosses, texts, key)
                effects["length_grouping"] = batcher_effects.length_grouping(
                    runtime, mixed, reps=2 if opts.quick else 5
                )
                effects["in_flight"] = batcher_effects.in_flight(runtime, texts, ceil_s)
        finally:
            runtime.close()
        raw = ceiling.raw_rate(model, texts, ceil_s)
        ceil["raw"] = raw.as_dict() if raw else None
        gc.collect()
        log(
            f"  ceiling: Runtime.predict {ceil['runtime']['texts_per_s']:,.0f} texts/s"
            + (f", raw session.run {raw.texts_per_s:,.0f} texts/s" if raw else "")
        )

        server_results: dict[str, Any] = {}
        kinds = ("batch", "single")
        for name, server in servers.items():
            _warm(server, bodies, opts)
            runs = _drive(server, bodies, opts, kinds, opts.concurrency)
            server_results[name] = {
                "ready_s": ready[name],
                "settings": server.settings if name == "textserve" else {},
                "cpus": list(server.cpus),
                "memory": server.memory(),
                "runs": runs,
            }
            stop(server)
        if opts.ablation:
            log(f"[{key}] textserve with max_wait_ms=0")
            s0 = start_textserve(model, workdir / "textserve-wait0.log", cpus, {"max_wait_ms": "0"})
            servers["textserve-max-wait-0"] = s0
            t_ready = wait_ready(s0, probe)
            _warm(s0, bodies, opts)
            conc = [c for c in opts.concurrency if c > 1]
            server_results["textserve-max-wait-0"] = {
                "ready_s": t_ready,
                "settings": s0.settings,
                "cpus": list(s0.cpus),
                "memory": s0.memory(),
                "runs": _drive(s0, bodies, opts, ("single",), conc),
            }
    finally:
        for s in servers.values():
            stop(s)
    return {
        "key": key,
        "title": model.title,
        "repo": str(model.repo),
        "version_dir": str(model.version_dir),
        "texts": "50-token cuts of WordNet glosses" if key == "seed" else "WordNet glosses",
        "mean_tokens": mean_tokens(texts),
        "ceiling": ceil,
        "batcher": effects,
        "servers": server_results,
    }


def _mixed_lengths(glosses: Sequence[str], texts: Sequence[str], key: str) -> list[str]:
    """Texts of varied length: glosses (short) interleaved with longer cuts."""
    longer = joined_texts(glosses, 40, 512) if key != "seed" else list(texts[:512])
    mixed: list[str] = []
    for a, b in zip(glosses[:512], longer, strict=False):
        mixed += [a, b]
    return mixed


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def run(opts: Options) -> dict[str, Any]:
    import tensorflow as tf

    glosses = gloss_texts()
    cpus = sorted(opts.server_cpus)
    result: dict[str, Any] = {
        "meta": {
            "command": opts.command,
            "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
            "mode": "quick" if opts.quick else "full",
            "duration_s": opts.duration_s,
            "concurrency": list(opts.concurrency),
            "cpu_count": os.cpu_count(),
            "cpu_model": _cpu_model(),
            "python": platform.python_version(),
            "tensorflow": tf.__version__,
            "cpu_note": (
                f"each server process pinned to CPUs {cpus} (os.sched_setaffinity), "
                "TensorFlow intra-op threads 2; wrk -t1 and this process unpinned, sharing "
                "the same cores (their CPU use is in the run table); the in-process ceiling "
                "ran while both servers sat idle."
            ),
        },
        "models": [],
    }
    for key in opts.models:
        result["models"].append(bench_model(key, glosses, opts))
    return result


def write_outputs(result: dict[str, Any], out: Path) -> dict[str, Path]:
    from bench.report import markdown, plot

    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "bench.json", "markdown": out / "bench.md", "png": out / "bench.png"}
    paths["json"].write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    paths["markdown"].write_text(markdown(result), encoding="utf-8")
    plot(result, paths["png"])
    return paths
