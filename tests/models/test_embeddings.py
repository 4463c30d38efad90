"""Embedding artifacts: GloVe (full and vocabulary subset) and the generated seed-scale matrix."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from models.embeddings import (
    CHUNK_ROWS,
    Glove,
    load_embedding,
    load_glove,
    write_generated,
    write_glove,
)
from server.artifact import OOV_ID, PAD_ID, load_embedding_manifest
from server.errors import ArtifactError


@pytest.fixture(scope="module")
def glove() -> Glove:
    return load_glove()


def test_glove_package(glove: Glove) -> None:
    assert len(glove.words) == 400_000
    assert glove.matrix.shape == (400_000, 50)
    assert glove.words[:3] == ["the", ",", "."]


def test_glove_subset_keeps_identical_vectors(tmp_path: Path, glove: Glove) -> None:
    art = write_glove(
        tmp_path / "sub", "sub", glove, keep=["zebra", "aardvark", "notaword123x"], top=100
    )
    words = art.vocab.tokens
    assert words[:3] == ["<pad>", "<unk>", "the"]
    assert "zebra" in art.vocab
    assert "aardvark" in art.vocab
    assert "notaword123x" not in art.vocab
    assert len(art.vocab) == 100 + 2 + 2
    m = art.matrix()
    for word in ("the", "zebra", "aardvark"):
        np.testing.assert_array_equal(m[art.vocab.id(word)], glove.matrix[glove.words.index(word)])
    assert not m[PAD_ID].any()
    np.testing.assert_allclose(m[OOV_ID], m[2:].mean(axis=0), rtol=1e-5, atol=1e-6)
    manifest = load_embedding_manifest(tmp_path / "sub")
    assert manifest.sha256 == hashlib.sha256(np.ascontiguousarray(m).tobytes()).hexdigest()
    assert manifest.files["matrix.npy"] == (tmp_path / "sub" / "matrix.npy").stat().st_size
    assert load_embedding(tmp_path / "sub").vocab.tokens == words


def test_generated_is_deterministic_across_chunks(tmp_path: Path) -> None:
    rows = CHUNK_ROWS + 1000  # crosses a chunk boundary
    a = write_generated(tmp_path / "a", "a", rows=rows, dim=4, seed=1, base_words=["x", "y"])
    b = write_generated(tmp_path / "b", "b", rows=rows, dim=4, seed=1)
    c = write_generated(tmp_path / "c", "c", rows=rows, dim=4, seed=2)
    assert a.manifest.sha256 != c.manifest.sha256
    np.testing.assert_array_equal(a.matrix(), b.matrix())  # vocabulary does not change values
    assert a.vocab.tokens[2:5] == ["x", "y", "w000000"]
    assert len(a.vocab) == rows
    assert a.vocab.tokens[-1] == f"w{rows - 5:06d}"
    m = a.matrix()
    assert m.shape == (rows, 4)
    assert m.dtype == np.float32
    assert 0.08 < float(m[2:].std()) < 0.12


def test_bad_artifacts(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="not found"):
        load_embedding(tmp_path / "missing")
    art = write_generated(tmp_path / "g", "g", rows=10, dim=3)
    (art.path / "vocab.txt").write_text("<pad>\n<unk>\nonly\n", encoding="utf-8")
    with pytest.raises(ArtifactError, match=r"vocab\.txt has 3 lines"):
        load_embedding(art.path)
    with pytest.raises(ArtifactError):
        write_generated(tmp_path / "h", "h", rows=2, dim=3)
