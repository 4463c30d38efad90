"""Broken models and hostile repositories: the model goes FAILED with the reason, the rest serve.

One real server over a copy of the small repository to which every kind of broken model is
added next to the good ones: a corrupt ``model.pb``, a truncated checkpoint, a missing and two
wrong-shape embeddings, labels that do not match the output size, an embedding holding a
pickle, and paths that escape the repository (``..``, a symlinked model directory, a symlinked
file, an escaping vocabulary and embedding path). For each, ``/v1/models`` says FAILED with the
reason, V2 readiness answers 400 ``ready: false``, inference answers 503, and the good models
keep serving in the same process. A ``models.yaml`` broken while serving changes nothing.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from server.artifact import EMBEDDING_JSON, MATRIX_NPY, MODEL_JSON, MODELS_YAML
from server.embeddings import array_sha256
from server.settings import Settings
from tests.server.conftest import (
    LiveServer,
    add_broken_model,
    copy_repo,
    edit_models_yaml,
    run_server,
)

TOKEN = "reliability-admin-token"
GOOD = ("pos", "noun-topic")
EMBEDDING = "glove-6b-50d-subset"


def private(path: Path) -> Path:
    """Replace a hard link into the shared fixture by a private copy, so it can be edited."""
    data = path.read_bytes()
    path.unlink()
    path.write_bytes(data)
    return path


def copy_version(repo: Path, source: str, name: str, number: int = 1) -> Path:
    dst = repo / name / str(number)
    shutil.copytree(repo / source, dst)
    return dst


def edit_json(path: Path, **changes: Any) -> None:
    data = json.loads(path.read_text(encoding="utf-8"))
    data.update(changes)
    path.unlink()
    path.write_text(json.dumps(data), encoding="utf-8")


def variant_embedding(repo: Path, name: str, matrix: np.ndarray[Any, Any] | None) -> Path:
    """``embeddings/<name>``: the real vocabulary, a different sha256 whose ``source_sha256`` is
    the real embedding's (so models trained on it accept it), and ``matrix`` (None: no file)."""
    src = repo / "embeddings" / EMBEDDING
    dst = repo / "embeddings" / name
    dst.mkdir(parents=True)
    shutil.copy2(src / "vocab.txt", dst / "vocab.txt")
    meta = json.loads((src / EMBEDDING_JSON).read_text(encoding="utf-8"))
    meta.update(name=name, source_sha256=meta["sha256"], sha256="0" * 64)
    if matrix is not None:
        np.save(dst / MATRIX_NPY, matrix, allow_pickle=matrix.dtype == object)
        if matrix.dtype != object:
            meta.update(sha256=array_sha256(matrix), dim=int(matrix.shape[1]))
    (dst / EMBEDDING_JSON).write_text(json.dumps(meta), encoding="utf-8")
    return dst


class Pickled:
    """Unpickling this creates ``marker`` (it must never happen)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.mkdir, (str(self.marker),))


def build_hostile_repo(small_repo: Path, root: Path) -> tuple[Path, dict[str, str]]:
    """The repository and, for each broken model, a fragment its FAILED reason must contain."""
    repo = copy_repo(small_repo, root / "repo")
    outside = root / "outside"
    shutil.copytree(repo / "pos", outside / "pos")
    edit_models_yaml(repo, {"verb-topic": None})
    for name in GOOD:
        edit_models_yaml(repo, {name: {"base_path": name, "version_policy": "latest"}})
    reasons: dict[str, str] = {}
    models: dict[str, dict[str, object] | None] = {}
    embeddings: list[dict[str, str]] = []

    # Corrupt graph file.
    add_broken_model(repo, source="pos/2", name="corrupt-pb")
    reasons["corrupt-pb"] = "model.pb: not a valid binary GraphDef"

    # Truncated checkpoint: half of the variables' data file.
    version = copy_version(repo, "pos/1", "truncated-ckpt")
    data_file = next(version.glob("model.ckpt.data-*"))
    private(data_file).write_bytes(data_file.read_bytes()[: data_file.stat().st_size // 2])
    models["truncated-ckpt"] = {"base_path": "truncated-ckpt"}
    reasons["truncated-ckpt"] = "cannot restore checkpoint: Read less bytes than requested"

    rows = json.loads((repo / "embeddings" / EMBEDDING / EMBEDDING_JSON).read_text())["rows"]
    real = np.load(repo / "embeddings" / EMBEDDING / MATRIX_NPY, allow_pickle=False)
    # Missing embedding matrix.
    variant_embedding(repo, "emb-missing", None)
    # matrix.npy with fewer rows than embedding.json says.
    short = variant_embedding(repo, "emb-short", real[: rows - 7])
    edit_json(short / EMBEDDING_JSON, rows=rows, sha256="1" * 64)
    # A consistent embedding of the wrong width for the model (20, the model needs 50).
    rng = np.random.default_rng(0)
    variant_embedding(repo, "emb-narrow", rng.standard_normal((rows, 20), dtype=np.float32))
    # An object array: loading it would unpickle and run os.mkdir(marker).
    marker = root / "unpickled-marker"
    pickled = np.empty((1,), dtype=object)
    pickled[0] = Pickled(marker)
    variant_embedding(repo, "emb-pickled", pickled)
    for emb, model, fragment in (
        ("emb-missing", "missing-embedding", "matrix.npy: embedding matrix not found"),
        ("emb-short", "short-embedding", f"but embedding.json says ({rows}, 50)"),
        ("emb-narrow", "narrow-embedding", "embedding_dim 50 != embedding"),
        ("emb-pickled", "pickled-embedding", "not a readable .npy"),
    ):
        embeddings.append({"name": emb, "path": f"embeddings/{emb}"})
        copy_version(repo, "pos/1", model)
        models[model] = {"base_path": model, "embedding": emb}
        reasons[model] = fragment

    # Labels that do not match the model's output size (4 outputs, 3 labels).
    version = copy_version(repo, "pos/2", "label-mismatch")
    edit_json(version / MODEL_JSON, labels=["adj", "adv", "noun"])
    models["label-mismatch"] = {"base_path": "label-mismatch"}
    reasons["label-mismatch"] = "outputs (4,) values per text but model.json has 3 labels"

    # Paths escaping the repository root.
    models["escape-dotdot"] = {"base_path": "../outside/pos"}
    reasons["escape-dotdot"] = "escapes the repository root"
    (repo / "escape-symlink").symlink_to(outside / "pos", target_is_directory=True)
    models["escape-symlink"] = {"base_path": "escape-symlink"}
    reasons["escape-symlink"] = "escapes the repository root"
    version = copy_version(repo, "pos/2", "symlinked-file")
    (version / "model.pb").unlink()
    (version / "model.pb").symlink_to(outside / "pos" / "2" / "model.pb")
    models["symlinked-file"] = {"base_path": "symlinked-file"}
    reasons["symlinked-file"] = "resolves outside the repository root"
    version = copy_version(repo, "pos/2", "vocab-escape")
    shutil.copy2(repo / "embeddings" / EMBEDDING / "vocab.txt", outside / "vocab.txt")
    edit_json(version / MODEL_JSON, vocab="../../../outside/vocab.txt", embedding=None)
    edit_json(version / MODEL_JSON, format="imported")
    models["vocab-escape"] = {"base_path": "vocab-escape"}
    reasons["vocab-escape"] = "escapes the repository root"
    embeddings.append({"name": "emb-outside", "path": "../outside/emb"})
    copy_version(repo, "pos/1", "embedding-escape")
    models["embedding-escape"] = {"base_path": "embedding-escape", "embedding": "emb-outside"}
    reasons["embedding-escape"] = "escapes the repository root"

    edit_models_yaml(repo, models)
    _add_embeddings(repo, embeddings)
    return repo, reasons


def _add_embeddings(repo: Path, entries: list[dict[str, str]]) -> None:
    import yaml

    path = repo / MODELS_YAML
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    data["embeddings"] = [*data.get("embeddings", []), *entries]
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")


@pytest.fixture(scope="module")
def hostile(
    small_repo: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[LiveServer, dict[str, str]]]:
    root = tmp_path_factory.mktemp("hostile")
    repo, reasons = build_hostile_repo(small_repo, root)
    settings = Settings(_env_file=None, repo=repo, admin_token=TOKEN)
    with run_server(settings) as live:
        yield live, reasons


@pytest.fixture
def http(hostile: tuple[LiveServer, dict[str, str]]) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=hostile[0].url, timeout=60) as c:
        yield c


BROKEN_MODELS = [
    "corrupt-pb",
    "truncated-ckpt",
    "missing-embedding",
    "short-embedding",
    "narrow-embedding",
    "pickled-embedding",
    "label-mismatch",
    "escape-dotdot",
    "escape-symlink",
    "symlinked-file",
    "vocab-escape",
    "embedding-escape",
]


def test_every_broken_model_is_listed(hostile: tuple[LiveServer, dict[str, str]]) -> None:
    assert set(hostile[1]) == set(BROKEN_MODELS)


@pytest.mark.parametrize("name", BROKEN_MODELS)
def test_broken_model_fails_with_its_reason(
    http: httpx.Client, hostile: tuple[LiveServer, dict[str, str]], name: str
) -> None:
    fragment = hostile[1][name]
    listed = {m["name"]: m for m in http.get("/v1/models").json()["models"]}
    model = listed[name]
    assert model["state"] == "FAILED", model
    assert fragment in model["reason"], model["reason"]
    assert len(model["reason"].splitlines()) == 1
    assert model["default_version"] is None

    r = http.get(f"/v2/models/{name}/ready")
    assert r.status_code == 400
    assert r.json()["ready"] is False
    assert r.json()["name"] == name
    assert fragment in r.json()["error"]

    r = http.post(f"/v1/models/{name}:classify", json={"texts": ["a small dog"]})
    assert r.status_code == 503
    assert fragment in r.json()["error"]
    assert r.headers["retry-after"] == "1"
    # The good models keep serving in the same process.
    for good in GOOD:
        assert (
            http.post(f"/v1/models/{good}:classify", json={"texts": ["to run"]}).status_code == 200
        )


def test_failed_versions_are_reported_per_version(http: httpx.Client) -> None:
    r = http.get("/v2/models/corrupt-pb/versions/1/ready")
    assert r.status_code == 400
    assert r.json()["ready"] is False
    status = http.get("/v1/models/corrupt-pb").json()["model_version_status"]
    assert status[0]["state"] == "END"
    assert status[0]["status"]["error_code"] == "UNKNOWN"
    assert "GraphDef" in status[0]["status"]["error_message"]


def test_nothing_was_unpickled(hostile: tuple[LiveServer, dict[str, str]]) -> None:
    repo = hostile[0].repo
    assert not (repo.parent / "unpickled-marker").exists()


def test_server_stays_ready_with_failed_models(http: httpx.Client) -> None:
    assert http.get("/v2/health/live").status_code == 200
    assert http.get("/v2/health/ready").json() == {"ready": True}


def test_models_yaml_broken_while_serving_changes_nothing(
    http: httpx.Client, hostile: tuple[LiveServer, dict[str, str]]
) -> None:
    path = hostile[0].repo / MODELS_YAML
    good = path.read_text(encoding="utf-8")
    auth = {"authorization": f"Bearer {TOKEN}"}
    try:
        for broken in ("models: [{name: pos, base_path: pos, version_policy: 7}]\n", "models: [\n"):
            path.write_text(broken, encoding="utf-8")
            r = http.post("/v2/repository/models/pos/load", headers=auth)
            assert r.status_code == 400, r.text
            assert "models.yaml" in r.json()["error"]
            assert "nothing was changed" in r.json()["error"]
            r = http.post("/v1/models/pos:classify", json={"texts": ["quickly"]})
            assert r.status_code == 200
            assert r.json()["version"] == "2"
    finally:
        path.write_text(good, encoding="utf-8")
    assert http.post("/v2/repository/models/pos/load", headers=auth).status_code == 200


def test_np_load_never_allows_pickles() -> None:
    """Every ``np.load`` in the server and the toolchain passes ``allow_pickle=False``, and
    nothing imports pickle or uses an unsafe YAML loader."""
    import re

    root = Path(__file__).resolve().parents[2]
    offenders = []
    for path in [*root.glob("server/**/*.py"), *root.glob("models/**/*.py")]:
        text = path.read_text(encoding="utf-8")
        for match in re.finditer(r"np\.load\((?:[^()]|\([^()]*\))*\)", text):
            if "allow_pickle=False" not in match.group(0):
                offenders.append(f"{path}: {match.group(0)}")
        for bad in ("import pickle", "yaml.load(", "unsafe_load", "dill", "cloudpickle"):
            if bad in text:
                offenders.append(f"{path}: {bad}")
    assert not offenders, offenders
