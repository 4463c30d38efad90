"""The toolchain commands: bad input gives one line on stderr and a non-zero exit, never a
traceback; a small train → export → init-from round trip through the real CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from models.data import load_wordnet
from server.artifact import ModelFormat, load_model_manifest, load_repository_config
from server.cli import main


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _one_line_error(err: str, *needles: str) -> None:
    lines = [line for line in err.splitlines() if line.startswith("textserve:")]
    assert len(lines) == 1, err
    assert lines[0].startswith("textserve: error: ")
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.fixture(scope="module")
def verbs_jsonl(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """~400 real verb glosses from all three splits, with custom field names."""
    ds = load_wordnet("verb").subset(300, 60, 60)
    path = tmp_path_factory.mktemp("data") / "verbs.jsonl"
    with path.open("w", encoding="utf-8") as f:
        for split in (ds.train, ds.validation, ds.test):
            for text, y in zip(split.texts, split.y, strict=True):
                f.write(json.dumps({"body": text, "topic": ds.labels[y]}) + "\n")
    return path


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("cli") / "repo"
    assert main(["gen-embedding", "--repo", str(path), "glove", "--top", "3000", "--register"]) == 0
    return path


def test_missing_dataset_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, _, err = _run(
        capsys, "train", "--data", str(tmp_path / "nope.jsonl"), "--embedding", "x", "--out", "o"
    )
    assert code == 1
    _one_line_error(err, "nope.jsonl: dataset file not found")


def test_unknown_label_column(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, repo: Path
) -> None:
    data = tmp_path / "d.csv"
    data.write_text("text,category\nhello there,a\ngood bye,b\n", encoding="utf-8")
    code, _, err = _run(
        capsys, "train", "--data", str(data), "--embedding", "glove-6b-50d-top3000",
        "--repo", str(repo), "--name", "m",
    )  # fmt: skip
    assert code == 2
    _one_line_error(err, "no column 'label'", "category")


def test_empty_dataset(capsys: pytest.CaptureFixture[str], tmp_path: Path, repo: Path) -> None:
    data = tmp_path / "empty.jsonl"
    data.write_text("\n\n", encoding="utf-8")
    code, _, err = _run(
        capsys, "train", "--data", str(data), "--embedding", "glove-6b-50d-top3000",
        "--repo", str(repo), "--name", "m",
    )  # fmt: skip
    assert code == 1
    _one_line_error(err, "empty")


def test_missing_embedding(capsys: pytest.CaptureFixture[str], verbs_jsonl: Path) -> None:
    code, _, err = _run(
        capsys, "train", "--data", str(verbs_jsonl), "--text-field", "body",
        "--label-field", "topic", "--embedding", "/nonexistent/emb", "--out", "o",
    )  # fmt: skip
    assert code == 1
    _one_line_error(err, "embedding directory not found")


def test_bad_options(capsys: pytest.CaptureFixture[str], verbs_jsonl: Path, repo: Path) -> None:
    code, _, err = _run(capsys, "train", "--data", str(verbs_jsonl), "--embedding", "x")
    assert code == 2
    _one_line_error(err, "--out")
    code, _, err = _run(
        capsys, "train", "--data", str(verbs_jsonl), "--embedding", "glove-6b-50d-top3000",
        "--repo", str(repo), "--name", "m", "--formats", "onnx",
    )  # fmt: skip
    assert code == 2
    _one_line_error(err, "unknown format 'onnx'")
    code, _, err = _run(
        capsys, "export", "--run", "/nonexistent", "--repo", str(repo), "--name", "m"
    )
    assert code == 1
    _one_line_error(err, "not found")


def test_existing_artifacts_are_refused(capsys: pytest.CaptureFixture[str], repo: Path) -> None:
    code, _, err = _run(capsys, "gen-embedding", "--repo", str(repo), "glove", "--top", "3000")
    assert code == 1
    _one_line_error(err, "already exists", "--force")
    code, _, err = _run(capsys, "build-demo", "--repo", str(repo))
    assert code == 1
    _one_line_error(err, "already exists", "--force")
    assert (repo / "models.yaml").exists()  # untouched


def test_no_traceback_through_the_real_entry_point(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "server.cli", "train", "--data", str(tmp_path / "x.csv"),
         "--embedding", "e", "--out", str(tmp_path / "o")],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        f"textserve: error: {tmp_path / 'x.csv'}: dataset file not found"
    ]


def test_train_export_and_init_from(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, verbs_jsonl: Path, repo: Path
) -> None:
    run_dir = tmp_path / "run"
    code, out, err = _run(
        capsys, "train", "--data", str(verbs_jsonl), "--text-field", "body",
        "--label-field", "topic", "--embedding", "glove-6b-50d-top3000", "--out", str(run_dir),
        "--repo", str(repo), "--name", "verbs", "--formats", "stripped,frozen",
        "--epochs", "1", "--num-filters", "8", "--filter-widths", "2,3", "--threads", "1",
    )  # fmt: skip
    assert code == 0, err
    assert "15 labels" in out
    assert load_model_manifest(run_dir).format == ModelFormat.CHECKPOINT
    config = load_repository_config(repo)
    verbs = config.model("verbs")
    assert verbs is not None
    assert verbs.version_policy == "latest"
    assert load_model_manifest(repo / "verbs" / "2").format == ModelFormat.FROZEN

    code, out, err = _run(
        capsys, "export", "--run", str(run_dir), "--repo", str(repo), "--name", "verbs-all"
    )
    assert code == 0, err
    for fmt in ("checkpoint", "stripped", "frozen-selfcontained", "savedmodel"):
        assert fmt in out
    formats = [load_model_manifest(repo / "verbs-all" / str(v)).format for v in range(1, 6)]
    assert formats == [
        ModelFormat.CHECKPOINT,
        ModelFormat.STRIPPED,
        ModelFormat.FROZEN,
        ModelFormat.FROZEN_SELFCONTAINED,
        ModelFormat.SAVEDMODEL,
    ]
    policy = load_repository_config(repo).model("verbs-all")
    assert policy is not None
    assert policy.version_policy != "latest"  # v5 (SavedModel) is not servable

    # Continue training from the self-contained frozen graph (the seed's way).
    pb = repo / "verbs-all" / "4" / "model.pb"
    code, out, err = _run(
        capsys, "train", "--data", str(verbs_jsonl), "--text-field", "body",
        "--label-field", "topic", "--embedding", str(repo / "embeddings" / "glove-6b-50d-top3000"),
        "--out", str(tmp_path / "run2"), "--init-from", str(pb), "--epochs", "1",
    )  # fmt: skip
    assert code == 0, err
    assert "filter widths (2, 3), 8 filters" in err
    assert (
        load_model_manifest(tmp_path / "run2").architecture
        == load_model_manifest(run_dir).architecture
    )


def test_init_from_dimension_mismatch(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, verbs_jsonl: Path, repo: Path
) -> None:
    # A frozen 50-d graph (random weights) for the 15 verb topics.
    from models.cnn import model_variable_shapes
    from models.embeddings import load_embedding
    from models.export import export
    from models.train import TrainedModel
    from server.artifact import CnnSpec, TokenizerSpec

    spec = CnnSpec(embedding_dim=50, filter_widths=(2, 3), num_filters=4, num_classes=15)
    rng = np.random.default_rng(0)
    weights = {
        n: rng.standard_normal(s).astype(np.float32) for n, s in model_variable_shapes(spec).items()
    }
    emb = load_embedding(repo / "embeddings" / "glove-6b-50d-top3000")
    labels = tuple(f"l{i}" for i in range(15))
    model = TrainedModel(spec, TokenizerSpec(), labels, weights, emb)
    pb = export(model, ModelFormat.FROZEN, tmp_path / "pb" / "1", "m", 1).path / "model.pb"
    code, _, err = _run(
        capsys, "gen-embedding", "--repo", str(tmp_path), "generated", "--rows", "500",
        "--dim", "16", "--name", "small16",
    )  # fmt: skip
    assert code == 0, err
    code, _, err = _run(
        capsys, "train", "--data", str(verbs_jsonl), "--text-field", "body",
        "--label-field", "topic", "--embedding", str(tmp_path / "embeddings" / "small16"),
        "--out", str(tmp_path / "run3"), "--init-from", str(pb),
    )  # fmt: skip
    assert code == 2
    _one_line_error(err, "embedding dimension mismatch", "50", "16")


def test_build_demo_quick_prints_cnn_and_baseline(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    repo = tmp_path / "demo"
    code, out, err = _run(capsys, "build-demo", "--quick", "--repo", str(repo))
    assert code == 0, err
    assert "TF-IDF" in out
    for name in ("noun-topic", "verb-topic", "pos"):
        assert name in out
    assert load_repository_config(repo).model("pos") is not None
