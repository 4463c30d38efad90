"""The quick demo repository (the ``small_repo`` fixture) is complete and consistent."""

from __future__ import annotations

from pathlib import Path

import pytest

from server.artifact import (
    ModelFormat,
    list_versions,
    load_embedding_manifest,
    load_model_manifest,
    load_repository_config,
    resolve_inside,
)


def test_small_repo_layout(small_repo: Path) -> None:
    config = load_repository_config(small_repo)
    assert [m.name for m in config.models] == ["noun-topic", "verb-topic", "pos"]
    assert len(config.embeddings) == 1
    emb = load_embedding_manifest(resolve_inside(small_repo, config.embeddings[0].path))
    expected_labels = {"noun-topic": 26, "verb-topic": 15, "pos": 4}
    for m in config.models:
        base = resolve_inside(small_repo, m.base_path)
        assert list_versions(base) == [1, 2]
        v1, v2 = load_model_manifest(base / "1"), load_model_manifest(base / "2")
        assert (v1.format, v2.format) == (ModelFormat.STRIPPED, ModelFormat.FROZEN)
        assert len(v1.labels) == expected_labels[m.name]
        assert v1.labels == v2.labels
        for man in (v1, v2):
            assert man.embedding is not None
            assert emb.compatible_with(man.embedding)
            for name, size in man.files.items():
                assert (base / str(man.version) / name).stat().st_size == size
    sc = load_model_manifest(small_repo / "unlisted" / "noun-topic-selfcontained" / "1")
    assert sc.format == ModelFormat.FROZEN_SELFCONTAINED
    assert sc.vocab == "vocab.txt"
    assert sc.labels == load_model_manifest(small_repo / "noun-topic" / "1").labels


def test_build_refuses_an_existing_repository(tmp_path: Path) -> None:
    from models.demo import build_repository
    from server.errors import ArtifactError

    (tmp_path / "models.yaml").write_text("models: []\n", encoding="utf-8")
    with pytest.raises(ArtifactError, match="--force"):
        build_repository(tmp_path, quick=True)
    assert (tmp_path / "models.yaml").read_text(encoding="utf-8") == "models: []\n"


def test_quick_models_beat_chance(small_repo: Path) -> None:
    """Even two epochs on a couple of thousand glosses learn something real."""
    for name, labels in (("noun-topic", 26), ("verb-topic", 15), ("pos", 4)):
        acc = load_model_manifest(small_repo / name / "1").metrics["test_accuracy"]
        assert acc > 2.0 / labels, (name, acc)
