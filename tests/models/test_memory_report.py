"""textserve memory-report end to end on the small demo repository (two fresh worker processes)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from server.artifact import load_embedding_manifest, load_repository_config
from server.cli import main


@pytest.mark.slow
def test_memory_report_demo_scale(small_repo: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    argv = ["memory-report", "--repo", str(small_repo), "--out", str(out), "--work"]
    argv += [str(tmp_path / "work"), "--scales", "demo", "--counts", "1"]
    argv += ["--strategies", "float32", "int8", "--eval-limit", "60", "--runs", "5"]
    argv += ["--throughput-s", "0.2"]
    assert main(argv) == 0
    report = json.loads((out / "report.json").read_text())
    assert (out / "memory_vs_models.png").stat().st_size > 1000
    md = (out / "report.md").read_text()
    assert "## Demo set" in md
    rows = {(r["strategy"], r["n"]): r for r in report["summary"]}
    assert set(rows) == {("float32", 1), ("int8", 1)}
    config = load_repository_config(small_repo)
    (emb,) = config.embeddings
    f32 = load_embedding_manifest(small_repo / emb.path)
    # Exact tensor accounting: the embedding counted once, int8 ≈ a quarter (+ scales).
    assert rows[("float32", 1)]["embedding_bytes"] == f32.rows * f32.dim * 4
    assert rows[("int8", 1)]["embedding_bytes"] == f32.rows * (f32.dim + 4)
    assert rows[("int8", 1)]["own_bytes"] == rows[("float32", 1)]["own_bytes"] > 0
    for r in rows.values():
        # The process really grew (TF session state at least) and the shared embedding's
        # pages were mapped; latencies were measured.
        assert r["rss_first"] > 0
        assert r["steady_batch1_ms"] > 0
        assert r["throughput_texts_s"] > 0
    # Accuracy on the test split of the set's model (noun-topic, the first listed).
    for strategy in ("float32", "int8"):
        (acc,) = rows[(strategy, 1)]["accuracy"].values()
        assert 0 < acc <= 1
    assert set(rows[("float32", 1)]["accuracy"]) == {"noun-topic"}
    names = [g["target"] for g in report["targets"]]
    assert any(n.startswith("demo: int8 accuracy drop") for n in names)
    drop = next(g for g in report["targets"] if g["target"].startswith("demo: int8 accuracy"))
    assert drop["ok"] in (True, False)
    # The user's repository was not modified (compressed copies live in the work directory).
    assert load_repository_config(small_repo) == config
    assert sorted(p.name for p in (small_repo / "embeddings").iterdir()) == [emb.name]


def test_memory_report_usage_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["memory-report", "--out", str(tmp_path), "--scales", "demo"]) == 2
    assert "--repo is required" in capsys.readouterr().err
    assert main(["memory-report", "--repo", str(tmp_path), "--out", str(tmp_path)]) == 2
    assert "no models.yaml" in capsys.readouterr().err
