"""One benchmark run: per model, in-process ceiling, textserve and the naive server side by side.

For each model the servers (textserve, the naive server and, unless disabled, textserve with
``max_wait_ms`` = :data:`ABLATION_WAIT_MS` against the default 0) are started together, each
its own process pinned to the server CPUs, and polled until they answer; this process loads
the same runtime for the in-process ceiling.
Then, ``repeats`` times: the ceiling is sampled, and for every (request kind, concurrency)
point wrk drives each server in turn, back to back, alternating which goes first. Only one
thing is measured at a time; the others sit idle. Reported figures are medians over the
repetitions, and textserve/naive ratios are medians of the back-to-back pairs: the machine
is shared, so only figures taken side by side are compared.
"""

from __future__ import annotations

import gc
import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from bench import batcher_effects, ceiling
from bench.models import QUICK, SEED, BenchModel, build_random_repo, demo_model
from bench.servers import Server, start_naive, start_textserve, stop, wait_idle, wait_ready
from bench.texts import gloss_texts, joined_texts, mean_tokens, write_bodies
from bench.wrk import run_wrk

Log = Callable[[str], None]
ABLATION_WAIT_MS = 2
"""The ``max_wait_ms`` the ablation variant runs with (the default is 0)."""
WAIT = f"textserve-max-wait-{ABLATION_WAIT_MS}"
WORKERS2 = "textserve-2w"
WORKERS2_SETTINGS = {"workers": "2"}
"""textserve with two worker processes sharing the port and the thread settings unset: on 2
cores one intra-op thread per worker and a lone request split over both cores (``idle_split``).
Side by side against 2 intra-op threads per worker (``docs/bench/README.md``, fifth session):
level for one 64-text client, +4 % for 64-text requests at 8 and 64 clients, +13 % for single
texts at 64."""


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
    repeats: int = 3
    batch_texts: int = 64
    ablation: bool = True
    effects: bool = True
    workers_variant: bool = True
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


def _point(
    server: Server, bodies: dict[str, Path], opts: Options, kind: str, c: int
) -> dict[str, Any]:
    """One wrk run against ``server`` at one load point, with the server's CPU use."""
    per_request = opts.batch_texts if kind == "batch" else 1
    settle = wait_idle(server)
    load = os.getloadavg()[0]
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
    row["loadavg_1m"] = load
    row["settle_s"] = settle
    ok_texts = r.ok_requests * per_request
    row["server_cpu_us_per_text"] = cpu / ok_texts * 1e6 if ok_texts else None
    opts.log(
        f"  {server.kind:9s} {kind:6s} c={c:<3d} {r.texts_per_s:10,.0f} texts/s  "
        f"p50 {r.p50_ms:7.1f} ms  p99 {r.p99_ms:7.1f} ms  non-2xx {r.non_2xx}  "
        f"server {row['server_cores']:.2f} cores ({row['server_cpu_us_per_text'] or 0:,.0f} "
        f"CPU us/text), wrk {row['wrk_cores']:.2f}, load {load:.1f}"
    )
    return row


def _warm(server: Server, bodies: dict[str, Path]) -> None:
    run_wrk(server.url, bodies["batch"], connections=4, duration_s=1, texts_per_request=64)
    run_wrk(server.url, bodies["single"], connections=8, duration_s=1, texts_per_request=1)


def _median(rows: Sequence[dict[str, Any]], key: str) -> float:
    return float(statistics.median(r[key] for r in rows))


def aggregate(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Medians over the repetitions of one (server, kind, concurrency) point."""
    first = samples[0]
    row: dict[str, Any] = {"kind": first["kind"], "connections": first["connections"]}
    for key in (
        "texts_per_s",
        "requests_per_s",
        "p50_ms",
        "p90_ms",
        "p99_ms",
        "max_ms",
        "mean_ms",
        "server_cores",
        "wrk_cores",
        "duration_s",
        "loadavg_1m",
    ):
        row[key] = _median(samples, key)
    per_text = [s["server_cpu_us_per_text"] for s in samples if s["server_cpu_us_per_text"]]
    row["server_cpu_us_per_text"] = float(statistics.median(per_text)) if per_text else None
    for key in ("requests", "non_2xx", "socket_errors"):
        row[key] = sum(int(s[key]) for s in samples)
    row["repetitions"] = len(samples)
    row["samples"] = list(samples)
    return row


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
    points = [(kind, c) for kind in ("batch", "single") for c in opts.concurrency]
    ablation_points = {("single", c) for c in opts.concurrency if c > 1} if opts.ablation else set()

    servers: dict[str, Server] = {}
    ready: dict[str, float] = {}
    started = time.monotonic()
    try:
        # All servers load at once; each then sits idle while another is measured.
        servers["textserve"] = start_textserve(model, workdir / "textserve.log", cpus)
        servers["naive"] = start_naive(model, workdir / "naive.log", cpus)
        if opts.workers_variant:
            servers[WORKERS2] = start_textserve(
                model, workdir / "textserve-2w.log", cpus, WORKERS2_SETTINGS
            )
        if ablation_points:
            servers[WAIT] = start_textserve(
                model, workdir / f"{WAIT}.log", cpus, {"max_wait_ms": str(ABLATION_WAIT_MS)}
            )
        for name, s in servers.items():
            wait_ready(s, probe)
            ready[name] = time.monotonic() - started
        log(f"[{key}] servers ready in {time.monotonic() - started:.1f} s")
        runtime = ceiling.load_server_runtime(model)
        try:
            for s in servers.values():
                _warm(s, bodies)
            ceil_s = max(1.0, opts.duration_s / 2)
            ceil_samples: list[ceiling.Rate] = []
            samples: dict[str, dict[tuple[str, int], list[dict[str, Any]]]] = {
                name: {} for name in servers
            }
            for rep in range(opts.repeats):
                log(f"[{key}] repetition {rep + 1}/{opts.repeats}")
                ceil_samples.append(ceiling.runtime_rate(runtime, texts, ceil_s))
                log(f"  ceiling   Runtime.predict {ceil_samples[-1].texts_per_s:10,.0f} texts/s")
                for i, point in enumerate(points):
                    names = ["textserve", "naive"]
                    if opts.workers_variant:
                        names.append(WORKERS2)
                    if point in ablation_points:
                        names.append(WAIT)
                    shift = (rep + i) % len(names)  # alternate who goes first
                    for name in names[shift:] + names[:shift]:
                        row = _point(servers[name], bodies, opts, *point)
                        samples[name].setdefault(point, []).append(row)
            memory = {name: s.memory() for name, s in servers.items()}
            for s in servers.values():
                stop(s)
            ceil: dict[str, Any] = {
                "runtime": _median_rate(ceil_samples),
                "runtime_samples": [r.as_dict() for r in ceil_samples],
                "tokenize": ceiling.tokenize_rate(runtime.tokenizer, texts, ceil_s).as_dict(),
                "two_callers": ceiling.two_callers_rate(model, texts, ceil_s).as_dict(),
            }
            effects: dict[str, Any] = {}
            if opts.effects:
                log(f"[{key}] batcher effects (in-process)")
                mixed = _mixed_lengths(glosses, texts, key)
                effects["length_grouping"] = batcher_effects.length_grouping(
                    runtime, mixed, reps=2 if opts.quick else 5
                )
                effects["in_flight"] = batcher_effects.in_flight(
                    runtime, texts, ceil_s / 2, reps=1 if opts.quick else 3
                )
        finally:
            runtime.close()
        raw = ceiling.raw_rate(model, texts, ceil_s)
        ceil["raw"] = raw.as_dict() if raw else None
        gc.collect()
    finally:
        for s in servers.values():
            stop(s)
    server_results: dict[str, Any] = {}
    for name, s in servers.items():
        runs = [aggregate(rows) for rows in samples[name].values()]
        server_results[name] = {
            "ready_s": ready[name],
            "settings": _effective_settings(s.settings) if s.kind == "textserve" else {},
            "cpus": list(s.cpus),
            "memory": memory[name],
            "runs": runs,
        }
    _paired_ratios(server_results, samples)
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


def _effective_settings(env: dict[str, str]) -> dict[str, Any]:
    """The batching and thread settings the textserve process ran with (defaults + env)."""
    from server.settings import Settings

    prefix = "TEXTSERVE_"
    overrides = {k[len(prefix) :].lower(): v for k, v in env.items() if k.startswith(prefix)}
    settings = Settings(**cast(dict[str, Any], overrides))  # and TEXTSERVE_* from os.environ
    keys = ("max_batch_size", "max_wait_ms", "max_queue", "inference_threads")
    return {k: getattr(settings, k) for k in keys} | settings.thread_layout()._asdict()


def _median_rate(rates: Sequence[ceiling.Rate]) -> dict[str, Any]:
    best = sorted(rates, key=lambda r: r.texts_per_s)[len(rates) // 2]
    return best.as_dict()


def _paired_ratios(
    results: dict[str, Any], samples: dict[str, dict[tuple[str, int], list[dict[str, Any]]]]
) -> None:
    """textserve (each variant) / naive per repetition (they ran back to back), median over
    repetitions."""
    for name in ("textserve", WORKERS2):
        for run in results.get(name, {}).get("runs", []):
            point = (run["kind"], run["connections"])
            ts = samples[name].get(point, [])
            nv = samples["naive"].get(point, [])
            ratios = [
                a["texts_per_s"] / b["texts_per_s"]
                for a, b in zip(ts, nv, strict=False)
                if b["texts_per_s"] > 0
            ]
            run["paired_ratio_vs_naive"] = float(statistics.median(ratios)) if ratios else None


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
            "repeats": opts.repeats,
            "concurrency": list(opts.concurrency),
            "cpu_count": os.cpu_count(),
            "cpu_model": _cpu_model(),
            "python": platform.python_version(),
            "tensorflow": tf.__version__,
            "cpu_note": (
                f"each server process pinned to CPUs {cpus} (os.sched_setaffinity), "
                "TensorFlow threads as each server's settings line says; wrk -t1 and this "
                "process unpinned, sharing "
                "the same cores (their CPU use is in the run table); the in-process ceiling "
                "ran while both servers sat idle."
            ),
        },
        "models": [],
    }
    for key in opts.models:
        result["models"].append(bench_model(key, glosses, opts))
    loads = [
        r["loadavg_1m"]
        for m in result["models"]
        for srv in m["servers"].values()
        for run in srv["runs"]
        for r in run["samples"]
    ]
    if loads:
        result["meta"]["loadavg"] = (
            f"median {statistics.median(loads):.1f}, range {min(loads):.1f}-{max(loads):.1f}"
        )
    return result


def reaggregate(result: dict[str, Any]) -> dict[str, Any]:
    """Recompute every aggregate row of a saved result from its raw samples."""
    for model in result["models"]:
        for server in model["servers"].values():
            runs = []
            for old in server["runs"]:
                row = aggregate(old["samples"])
                if "paired_ratio_vs_naive" in old:
                    row["paired_ratio_vs_naive"] = old["paired_ratio_vs_naive"]
                runs.append(row)
            server["runs"] = runs
    return result


def write_outputs(result: dict[str, Any], out: Path) -> dict[str, Path]:
    from bench.report import markdown, plot

    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "bench.json", "markdown": out / "bench.md", "png": out / "bench.png"}
    paths["json"].write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    paths["markdown"].write_text(markdown(result), encoding="utf-8")
    plot(result, paths["png"])
    return paths
