"""``textserve bench``: load benchmark, in-process ceiling vs textserve vs a naive server.

Per model (``demo``: the demo repository's noun-topic or a demo-like GloVe 50d model; ``seed``:
a 220k x 300 seed-scale model), in one run on this machine:

1. the ceiling: the server's ``Runtime.predict`` in-process at batch 64 (and a raw
   ``session.run`` with the gather in the graph, for reference);
2. the real ``textserve serve`` over HTTP, driven by ``wrk -t1`` with ``bench/post.lua``:
   64-text and 1-text requests at each concurrency;
3. ``bench/naive_server.py`` (FastAPI + pydantic, one ``predict`` per request), same loads.

Writes ``bench.json``, ``bench.md`` (tables with HTTP/ceiling and textserve/naive ratios) and
``bench.png`` (throughput and p99 vs concurrency) to ``--out``. ``--quick`` runs a small model
for a few seconds per point (CI).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path

from server.errors import UsageError


def _ints(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None
    if not values or any(v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected non-negative integers, got {text!r}")
    return values


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=Path("docs/bench"), help="output directory")
    parser.add_argument(
        "--work",
        type=Path,
        default=Path("bench/out"),
        help="where benchmark model repositories and logs are kept (reused between runs)",
    )
    parser.add_argument("--quick", action="store_true", help="small model, short runs (CI)")
    parser.add_argument(
        "--models",
        default=None,
        help="comma-separated: quick, demo, seed (default: demo,seed; --quick: quick)",
    )
    parser.add_argument(
        "--duration", type=float, default=None, help="seconds per load point (default 5; quick 1)"
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="repetitions of every point, interleaved across servers (default 3; quick 1)",
    )
    parser.add_argument(
        "--concurrency",
        type=_ints,
        default=None,
        help="comma-separated connection counts (default 1,8,64; quick 1,8)",
    )
    parser.add_argument(
        "--demo-repo",
        type=Path,
        default=Path("model_repository"),
        help="demo repository to take noun-topic from, if it exists",
    )
    parser.add_argument(
        "--server-cpus",
        type=_ints,
        default=None,
        help="CPUs each server process is pinned to (default: all this process may use)",
    )
    parser.add_argument(
        "--no-ablation",
        action="store_true",
        help="skip the textserve runs with max_wait_ms=2 (the default is 0)",
    )
    parser.add_argument(
        "--no-workers",
        action="store_true",
        help="skip the `--workers 2` textserve runs",
    )
    parser.add_argument(
        "--report-from",
        type=Path,
        default=None,
        metavar="BENCH_JSON",
        help="measure nothing: re-aggregate a saved bench.json and rewrite the reports in --out",
    )


def run(args: argparse.Namespace) -> int:
    from bench.run import Options, reaggregate, write_outputs
    from bench.run import run as run_bench

    if args.report_from is not None:
        try:
            saved = json.loads(args.report_from.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise UsageError(f"{args.report_from}: not JSON: {exc}") from None
        for kind, path in write_outputs(reaggregate(saved), args.out).items():
            print(f"{kind}: {path}")
        return 0

    quick: bool = args.quick
    models = (args.models or ("quick" if quick else "demo,seed")).split(",")
    unknown = [m for m in models if m not in ("quick", "demo", "seed")]
    if unknown:
        raise UsageError(f"unknown model(s) {', '.join(unknown)} (quick, demo, seed)")
    duration = args.duration if args.duration is not None else (1.0 if quick else 5.0)
    repeats = args.repeats if args.repeats is not None else (1 if quick else 3)
    if repeats < 1:
        raise UsageError("--repeats must be at least 1")
    if duration < 1:
        raise UsageError("--duration must be at least 1 second (wrk's resolution)")
    available = sorted(os.sched_getaffinity(0))
    cpus = args.server_cpus or available
    if not set(cpus) <= set(available):
        raise UsageError(f"--server-cpus {cpus} not within the CPUs available {available}")
    opts = Options(
        out=args.out,
        work=args.work,
        models=models,
        duration_s=duration,
        repeats=repeats,
        concurrency=args.concurrency or ([1, 8] if quick else [1, 8, 64]),
        quick=quick,
        demo_repo=args.demo_repo,
        server_cpus=cpus,
        ablation=not (quick or args.no_ablation),
        workers_variant=not args.no_workers,
        command="textserve " + shlex.join(sys.argv[1:]),
        log=lambda line: print(line, flush=True),
    )
    result = run_bench(opts)
    paths = write_outputs(result, args.out)
    for kind, path in paths.items():
        print(f"{kind}: {path}")
    return 0
