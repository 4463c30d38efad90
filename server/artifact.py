"""The model repository contract, shared by the toolchain (writer) and the server (reader).

Layout::

    REPO/
      models.yaml                       the set: models, versions policy, batching, embeddings
      embeddings/<name>/embedding.json  EmbeddingManifest
      embeddings/<name>/vocab.txt       one token per line; line i is id i (0 = PAD, 1 = OOV)
      embeddings/<name>/matrix.npy      [rows, dim] float32 | float16 | int8
      embeddings/<name>/scales.npy      [rows] float32, int8 only (per-row scale)
      <model>/<version>/model.json      ModelManifest
      <model>/<version>/...             the format's files (see ModelFormat)

Every path inside the repository is resolved with :func:`resolve_inside`, which refuses
anything that escapes the repository root (``..``, absolute paths, symlinks pointing out).
Nothing here is ever unpickled: manifests are JSON/YAML, arrays are ``.npy`` loaded with
``allow_pickle=False``.
"""

from __future__ import annotations

import hashlib
import json
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from server.errors import ArtifactError, ConfigError

MODELS_YAML = "models.yaml"
MODEL_JSON = "model.json"
EMBEDDING_JSON = "embedding.json"
EMBEDDINGS_DIR = "embeddings"
VOCAB_TXT = "vocab.txt"
MATRIX_NPY = "matrix.npy"
SCALES_NPY = "scales.npy"

PAD_ID = 0
OOV_ID = 1
PAD_TOKEN = "<pad>"
OOV_TOKEN = "<unk>"

# Stable tensor names of the textserve CNN (see server/graph.py).
INPUT_IDS = "input_x:0"
EMBEDDED = "embedding/lookup:0"
DROPOUT = "dropout_keep_prob:0"
LOGITS = "output/logits:0"
PROBS = "output/probs:0"
PREDICTIONS = "output/predictions:0"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelFormat(StrEnum):
    """How a model version is stored on disk.

    ``stripped``  trainable variables only (``model.ckpt.*``), graph rebuilt from ``model.json``.
    ``frozen``    embedding-external frozen GraphDef (``model.pb``), embedding read from the store.
    ``frozen-selfcontained``  frozen GraphDef with the embedding inside (the seed's way); the
                  server cuts the embedding out at load and shares it by content hash.
    ``imported``  a frozen GraphDef made elsewhere (``textserve import-graph``).
    ``checkpoint``  full TF1 checkpoint with Adam slots and meta graph (a baseline; not served).
    ``savedmodel``  TF SavedModel for TensorFlow Serving users (not served by textserve).
    """

    STRIPPED = "stripped"
    FROZEN = "frozen"
    FROZEN_SELFCONTAINED = "frozen-selfcontained"
    IMPORTED = "imported"
    CHECKPOINT = "checkpoint"
    SAVEDMODEL = "savedmodel"


SERVABLE_FORMATS = frozenset(
    {
        ModelFormat.STRIPPED,
        ModelFormat.FROZEN,
        ModelFormat.FROZEN_SELFCONTAINED,
        ModelFormat.IMPORTED,
    }
)

SHARED_EMBEDDING_FORMATS = frozenset({ModelFormat.STRIPPED, ModelFormat.FROZEN})
"""Formats whose graph has no embedding: rows of a shared embedding artifact are fed to it."""


class EmbeddingDtype(StrEnum):
    FLOAT32 = "float32"
    FLOAT16 = "float16"
    INT8 = "int8"


class TokenizerSpec(_Strict):
    """Tokenization settings, saved in every model.json (same code at training and serving)."""

    lowercase: bool = True
    max_len: int = Field(default=100, ge=1, le=10_000)
    """Texts longer than this many tokens are truncated."""
    min_len: int = Field(default=3, ge=1)
    """Batches are padded to at least this many tokens (the widest filter)."""
    fixed_len: int | None = Field(default=None, ge=1, le=10_000)
    """If set, every batch is padded/truncated to exactly this length (graphs made elsewhere)."""


class CnnSpec(_Strict):
    """Architecture of the shallow CNN, enough to rebuild its graph for a stripped checkpoint."""

    embedding_dim: int = Field(ge=1)
    filter_widths: tuple[int, ...] = (1, 2, 3)
    num_filters: int = Field(default=128, ge=1)
    num_classes: int = Field(ge=2)

    @field_validator("filter_widths")
    @classmethod
    def _widths_positive(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if not v or any(w < 1 for w in v):
            raise ValueError("filter_widths must be a non-empty list of positive integers")
        return v


class TensorNames(_Strict):
    """Names of the graph tensors the runtime feeds and fetches."""

    input_ids: str = INPUT_IDS
    embedded: str | None = EMBEDDED
    """Output of the embedding lookup; the runtime feeds gathered rows here."""
    dropout: str | None = DROPOUT
    """Fed 1.0 at serving time if present."""
    output: str = PROBS
    """Probabilities, or logits when ``ModelManifest.apply_softmax`` is true."""


class EmbeddingRef(_Strict):
    name: str
    sha256: str


class ModelManifest(_Strict):
    """``REPO/<model>/<version>/model.json``."""

    name: str
    version: int = Field(ge=1)
    format: ModelFormat
    labels: tuple[str, ...]
    tokenizer: TokenizerSpec
    architecture: CnnSpec | None = None
    tensors: TensorNames = TensorNames()
    apply_softmax: bool = False
    embedding: EmbeddingRef | None = None
    """The shared embedding the model was trained with (None: self-contained/imported)."""
    vocab: str | None = None
    """The model's own vocabulary file (self-contained and imported graphs)."""
    files: dict[str, int] = {}
    """File name → bytes on disk, as exported."""
    metrics: dict[str, float] = {}
    created_at: str | None = None
    textserve_version: str | None = None

    @field_validator("labels")
    @classmethod
    def _labels(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if len(v) < 2:
            raise ValueError("a classifier needs at least two labels")
        if len(set(v)) != len(v):
            raise ValueError("labels must be unique")
        return v


class EmbeddingManifest(_Strict):
    """``REPO/embeddings/<name>/embedding.json``."""

    name: str
    rows: int = Field(ge=2)
    dim: int = Field(ge=1)
    dtype: EmbeddingDtype
    sha256: str
    """sha256 of the matrix's raw bytes (C order), plus the scales' bytes for int8."""
    source_sha256: str | None = None
    """For a compressed copy: the sha256 of the float32 matrix it was made from."""
    source: str = ""
    """Human description (e.g. ``GloVe 6B 50d``, ``generated 220k x 300``)."""
    files: dict[str, int] = {}

    def compatible_with(self, ref: EmbeddingRef) -> bool:
        """True if a model trained against ``ref`` may read this embedding."""
        return ref.sha256 in (self.sha256, self.source_sha256)


class BatchingConfig(_Strict):
    max_batch_size: int | None = Field(default=None, ge=1, le=4096)
    max_wait_ms: float | None = Field(default=None, ge=0, le=1000)
    max_queue: int | None = Field(default=None, ge=1)
    """Bound on queued texts; beyond it requests get 503 + Retry-After."""
    max_in_flight: int | None = Field(default=None, ge=1, le=64)
    """Predicts of one version running at once (default: the server's ``max_in_flight``)."""


class SpecificVersions(_Strict):
    specific: tuple[int, ...] = Field(min_length=1)


VersionPolicy = Literal["latest", "all"] | SpecificVersions


class ModelConfig(_Strict):
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")]
    base_path: str
    """Directory holding numbered version directories, relative to the repository."""
    format: ModelFormat | None = None
    """Expected format; when None, taken from each version's model.json."""
    version_policy: VersionPolicy = "latest"
    embedding: str | None = None
    """Name of an embedding in this file; overrides the one in model.json (e.g. an int8 copy)."""
    batching: BatchingConfig = BatchingConfig()


class EmbeddingConfig(_Strict):
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")]
    path: str
    """Directory holding embedding.json, relative to the repository."""
    dtype: EmbeddingDtype | None = None
    """Expected dtype; checked against embedding.json when set."""


class RepositoryConfig(_Strict):
    """``REPO/models.yaml``."""

    models: tuple[ModelConfig, ...] = ()
    embeddings: tuple[EmbeddingConfig, ...] = ()

    @field_validator("models")
    @classmethod
    def _unique_models(cls, v: tuple[ModelConfig, ...]) -> tuple[ModelConfig, ...]:
        names = [m.name for m in v]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"duplicate model names: {sorted(dup)}")
        return v

    @field_validator("embeddings")
    @classmethod
    def _unique_embeddings(cls, v: tuple[EmbeddingConfig, ...]) -> tuple[EmbeddingConfig, ...]:
        names = [e.name for e in v]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"duplicate embedding names: {sorted(dup)}")
        return v

    def model(self, name: str) -> ModelConfig | None:
        return next((m for m in self.models if m.name == name), None)

    def embedding(self, name: str) -> EmbeddingConfig | None:
        return next((e for e in self.embeddings if e.name == name), None)


# ---------------------------------------------------------------------------------------------
# Reading and writing


def _short(err: ValidationError) -> str:
    parts = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(root)"
        parts.append(f"{loc}: {e['msg']}")
    return "; ".join(parts)


def resolve_inside(root: Path, relative: str | Path) -> Path:
    """Resolve ``relative`` under ``root``; refuse anything that ends up outside it."""
    root_real = Path(root).resolve()
    rel = Path(relative)
    if rel.is_absolute():
        raise ArtifactError(f"path {str(relative)!r} must be relative to the repository")
    target = (root_real / rel).resolve()
    if target != root_real and root_real not in target.parents:
        raise ArtifactError(f"path {str(relative)!r} escapes the repository root")
    return target


def load_repository_config(repo: Path) -> RepositoryConfig:
    path = Path(repo) / MODELS_YAML
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ConfigError(f"{path}: not found") from exc
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping with 'models' and 'embeddings'")
    try:
        return RepositoryConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"{path}: {_short(exc)}") from exc


def write_repository_config(repo: Path, config: RepositoryConfig) -> Path:
    path = Path(repo) / MODELS_YAML
    data = config.model_dump(mode="json", exclude_defaults=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ArtifactError(f"{path}: not found") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{path}: not valid JSON: {exc}") from exc


def load_model_manifest(version_dir: Path) -> ModelManifest:
    path = Path(version_dir) / MODEL_JSON
    try:
        return ModelManifest.model_validate(_read_json(path))
    except ValidationError as exc:
        raise ArtifactError(f"{path}: {_short(exc)}") from exc


def write_model_manifest(version_dir: Path, manifest: ModelManifest) -> Path:
    path = Path(version_dir) / MODEL_JSON
    path.write_text(manifest.model_dump_json(indent=2), encoding="utf-8")
    return path


def load_embedding_manifest(embedding_dir: Path) -> EmbeddingManifest:
    path = Path(embedding_dir) / EMBEDDING_JSON
    try:
        return EmbeddingManifest.model_validate(_read_json(path))
    except ValidationError as exc:
        raise ArtifactError(f"{path}: {_short(exc)}") from exc


def write_embedding_manifest(embedding_dir: Path, manifest: EmbeddingManifest) -> Path:
    path = Path(embedding_dir) / EMBEDDING_JSON
    path.write_text(manifest.model_dump_json(indent=2), encoding="utf-8")
    return path


def list_versions(model_dir: Path) -> list[int]:
    """Numbered version directories under a model's base path, ascending."""
    if not Path(model_dir).is_dir():
        return []
    return sorted(int(p.name) for p in Path(model_dir).iterdir() if p.is_dir() and p.name.isdigit())


def select_versions(available: list[int], policy: VersionPolicy) -> list[int]:
    if not available:
        return []
    if policy == "latest":
        return [max(available)]
    if policy == "all":
        return sorted(available)
    assert isinstance(policy, SpecificVersions)
    return sorted(v for v in set(policy.specific) if v in available)


def sha256_bytes(*chunks: bytes | memoryview) -> str:
    h = hashlib.sha256()
    for c in chunks:
        h.update(c)
    return h.hexdigest()


def dir_files(directory: Path) -> dict[str, int]:
    """File name → size for every regular file directly inside ``directory`` (recursive names)."""
    root = Path(directory)
    return {
        str(p.relative_to(root)): p.stat().st_size
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != MODEL_JSON
    }
