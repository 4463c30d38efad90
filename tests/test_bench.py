"""``textserve bench --quick``: the real command, real servers, real wrk; its output parsed."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = [
    pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk is not installed"),
    pytest.mark.slow,  # ~1 min: three processes load TensorFlow
]


@pytest.fixture(scope="module")
def quick_run(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[Path, subprocess.CompletedProcess[str]]:
    out = tmp_path_factory.mktemp("bench-out")
    work = tmp_path_factory.mktemp("bench-work")
    cmd = [sys.executable, "-m", "server.cli", "bench", "--quick", "--out", str(out)]
    cmd += ["--work", str(work), "--demo-repo", str(work / "absent")]
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=600, check=False, env=dict(os.environ)
    )
    return out, proc


def test_quick_bench_runs_and_reports(
    quick_run: tuple[Path, subprocess.CompletedProcess[str]],
) -> None:
    out, proc = quick_run
    assert proc.returncode == 0, proc.stderr[-4000:] + proc.stdout[-4000:]
    result: dict[str, Any] = json.loads((out / "bench.json").read_text())
    assert result["meta"]["mode"] == "quick"
    (model,) = result["models"]
    assert model["key"] == "quick"

    ceiling = model["ceiling"]
    assert ceiling["runtime"]["texts_per_s"] > 0
    assert ceiling["runtime"]["batch"] == 64
    assert ceiling["raw"]["texts_per_s"] > 0
    assert ceiling["tokenize"]["texts_per_s"] > 0
    assert ceiling["runtime"]["cpu_us_per_text"] > 0
    two = ceiling["two_callers"]  # measured in a fresh process: 2 threads calling predict
    assert two["texts_per_s"] > 0
    assert two["batch"] == 64
    assert two["calls"] >= 2

    assert model["servers"]["textserve-2w"]["memory"]["processes"] == 3  # supervisor + 2
    for server in ("textserve", "naive", "textserve-2w"):
        runs = model["servers"][server]["runs"]
        points = {(r["kind"], r["connections"]) for r in runs}
        assert points == {("batch", 1), ("batch", 8), ("single", 1), ("single", 8)}
        for r in runs:
            assert r["requests"] > 0
            assert r["non_2xx"] == 0, (server, r)
            assert r["socket_errors"] == 0, (server, r)
            assert r["texts_per_s"] > 0
            assert 0 < r["p50_ms"] <= r["p99_ms"] <= r["max_ms"]
            expected = r["requests"] * (64 if r["kind"] == "batch" else 1) / r["duration_s"]
            assert r["texts_per_s"] == pytest.approx(expected)
            assert r["server_cores"] > 0
            assert r["server_cpu_us_per_text"] > 0

    effects = model["batcher"]
    grouping = effects["length_grouping"]
    assert grouping["grouped"]["padded_fraction"] < grouping["arrival_order"]["padded_fraction"]
    assert effects["in_flight"]["max_in_flight_1"]["texts_per_s"] > 0


def test_quick_bench_writes_markdown_and_png(
    quick_run: tuple[Path, subprocess.CompletedProcess[str]],
) -> None:
    out, proc = quick_run
    assert proc.returncode == 0, proc.stderr[-4000:]
    md = (out / "bench.md").read_text()
    result = json.loads((out / "bench.json").read_text())
    ts = next(
        r
        for r in result["models"][0]["servers"]["textserve"]["runs"]
        if r["kind"] == "batch" and r["connections"] == 8
    )
    assert f"| 64 texts/request | 8 | {ts['texts_per_s']:,.0f} |" in md
    assert "ts/naive" in md
    assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_session_overhead_script_reports_a_positive_floor() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "bench.session_overhead", "--models", "3"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    match = re.search(r"without a run: ([0-9.]+) MiB anonymous memory per model", done.stdout)
    assert match, done.stdout
    assert 0.05 < float(match.group(1)) < 50


def test_ratios_to_the_ceiling_are_paired_by_repetition() -> None:
    """Each repetition's HTTP figure over the ceiling sampled in that repetition, then the
    median: a ceiling that drifts with the machine's load moves both sides of each ratio."""
    from bench.report import vs_ceiling

    model = {
        "ceiling": {
            "runtime": {"texts_per_s": 6000.0},
            "runtime_samples": [
                {"texts_per_s": 8000.0},
                {"texts_per_s": 6000.0},
                {"texts_per_s": 4000.0},
            ],
        }
    }
    run = {
        "texts_per_s": 3600.0,
        "samples": [{"texts_per_s": 7200.0}, {"texts_per_s": 3600.0}, {"texts_per_s": 3200.0}],
    }
    assert vs_ceiling(run, model) == pytest.approx(0.8)  # 0.9, 0.6, 0.8; unpaired: 0.6
    unpaired = {"texts_per_s": 3000.0, "samples": [{"texts_per_s": 3000.0}]}
    assert vs_ceiling(unpaired, model) == pytest.approx(0.5)
    assert vs_ceiling(None, model) is None
