"""The models the benchmark serves, written with the toolchain's own exporters.

Speed does not depend on weight values, so the benchmark models get random (Glorot) weights and
are exported ``stripped`` exactly like trained ones:

* ``quick``: a small generated embedding (20 000 x 50) and 32 filters of widths 1-3 (CI);
* ``demo``: the demo repository's ``noun-topic`` when one is present (``textserve build-demo``),
  else a demo-like model: the full GloVe 6B 50d embedding (400 002 rows) with noun-topic's
  architecture (widths 1-3 x 256 filters, 26 labels), random weights;
* ``seed``: seed scale, a generated 220 000 x 300 embedding, widths 1-3 x 128 filters.

Built repositories are cached under the work directory and reused when their recipe matches.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from server.artifact import (
    EMBEDDINGS_DIR,
    MODELS_YAML,
    CnnSpec,
    EmbeddingConfig,
    ModelConfig,
    ModelFormat,
    ModelManifest,
    RepositoryConfig,
    TokenizerSpec,
    list_versions,
    load_model_manifest,
    load_repository_config,
    resolve_inside,
    write_repository_config,
)
from server.errors import ArtifactError
from server.text import tokenize

RECIPE_JSON = "bench-recipe.json"


@dataclass(frozen=True)
class Recipe:
    """How to build a random-weight benchmark model."""

    key: str
    title: str
    rows: int | None
    """Generated embedding rows; None: the full GloVe 6B 50d."""
    dim: int
    filter_widths: tuple[int, ...]
    num_filters: int
    num_classes: int
    max_len: int = 100
    seed: int = 0


QUICK = Recipe("quick", "quick: generated 20k x 50, widths 1-3 x 32", 20_000, 50, (1, 2, 3), 32, 4)
DEMO_LIKE = Recipe(
    "demo", "demo-like: GloVe 6B 50d (400k rows), widths 1-3 x 256", None, 50, (1, 2, 3), 256, 26
)
SEED = Recipe(
    "seed", "seed scale: generated 220k x 300, widths 1-3 x 128", 220_000, 300, (1, 2, 3), 128, 26
)


@dataclass(frozen=True)
class BenchModel:
    """One served model: where its repository, version and embedding are."""

    key: str
    title: str
    repo: Path
    name: str
    version_dir: Path
    embedding_dir: Path | None
    manifest: ModelManifest


def random_weights(spec: CnnSpec, seed: int) -> dict[str, np.ndarray]:
    """Glorot-uniform kernels and 0.1 biases, like a freshly initialised model."""
    from models.cnn import model_variable_shapes

    rng = np.random.default_rng(seed)
    weights: dict[str, np.ndarray] = {}
    for name, shape in model_variable_shapes(spec).items():
        if name.endswith("/b"):
            weights[name] = np.full(shape, 0.1, dtype=np.float32)
        else:
            fan_in = int(np.prod(shape[:-1]))
            limit = float(np.sqrt(6.0 / (fan_in + shape[-1])))
            weights[name] = rng.uniform(-limit, limit, shape).astype(np.float32)
    return weights


def _vocabulary_words(texts: Sequence[str]) -> list[str]:
    """Tokens of ``texts`` by first occurrence: the generated embedding's first real words."""
    seen: dict[str, None] = {}
    for t in texts:
        for tok in tokenize(t):
            seen.setdefault(tok, None)
    return [w for w in seen if w not in ("<pad>", "<unk>")]


def build_random_repo(repo: Path, recipe: Recipe, texts: Sequence[str]) -> BenchModel:
    """Write (or reuse) ``repo`` holding one stripped random-weight model for ``recipe``."""
    from models.embeddings import embedding_dir, write_generated, write_glove
    from models.export import export
    from models.train import TrainedModel

    stamp = json.dumps({"recipe": recipe.__dict__, "texts": len(texts)}, sort_keys=True)
    name = f"bench-{recipe.key}"
    if (repo / RECIPE_JSON).is_file() and (repo / RECIPE_JSON).read_text() == stamp:
        return resolve_model(repo, name, recipe.key, recipe.title)
    if repo.exists():
        shutil.rmtree(repo)
    repo.mkdir(parents=True)
    emb_name = f"{name}-embedding"
    if recipe.rows is None:
        art = write_glove(embedding_dir(repo, emb_name), emb_name)
    else:
        art = write_generated(
            embedding_dir(repo, emb_name),
            emb_name,
            rows=recipe.rows,
            dim=recipe.dim,
            seed=recipe.seed,
            base_words=_vocabulary_words(texts),
        )
    spec = CnnSpec(
        embedding_dim=recipe.dim,
        filter_widths=recipe.filter_widths,
        num_filters=recipe.num_filters,
        num_classes=recipe.num_classes,
    )
    model = TrainedModel(
        spec=spec,
        tokenizer=TokenizerSpec(max_len=recipe.max_len),
        labels=tuple(f"label-{i:02d}" for i in range(recipe.num_classes)),
        weights=random_weights(spec, recipe.seed),
        embedding=art,
    )
    export(model, ModelFormat.STRIPPED, repo / name / "1", name, 1, force=True)
    write_repository_config(
        repo,
        RepositoryConfig(
            models=(ModelConfig(name=name, base_path=name),),
            embeddings=(EmbeddingConfig(name=emb_name, path=f"{EMBEDDINGS_DIR}/{emb_name}"),),
        ),
    )
    (repo / RECIPE_JSON).write_text(stamp)
    return resolve_model(repo, name, recipe.key, recipe.title)


def resolve_model(repo: Path, name: str, key: str, title: str) -> BenchModel:
    """The newest version of model ``name`` in ``repo`` and the embedding it reads."""
    config = load_repository_config(repo)
    mc = config.model(name)
    if mc is None:
        raise ArtifactError(f"{repo / MODELS_YAML}: no model {name!r}")
    base = resolve_inside(repo, mc.base_path)
    versions = list_versions(base)
    if not versions:
        raise ArtifactError(f"{base}: no version directories")
    version_dir = base / str(max(versions))
    manifest = load_model_manifest(version_dir)
    emb_name = mc.embedding or (manifest.embedding.name if manifest.embedding else None)
    emb_dir: Path | None = None
    if emb_name is not None:
        ec = config.embedding(emb_name)
        if ec is None:
            raise ArtifactError(f"{repo / MODELS_YAML}: no embedding {emb_name!r}")
        emb_dir = resolve_inside(repo, ec.path)
    return BenchModel(key, title, repo, name, version_dir, emb_dir, manifest)


def demo_model(demo_repo: Path | None, work: Path, texts: Sequence[str]) -> BenchModel:
    """The demo repository's noun-topic if ``demo_repo`` holds one, else the demo-like model."""
    if demo_repo is not None and (demo_repo / MODELS_YAML).is_file():
        config = load_repository_config(demo_repo)
        name = "noun-topic" if config.model("noun-topic") else config.models[0].name
        m = resolve_model(demo_repo, name, "demo", "")
        arch = m.manifest.architecture
        shape = f", widths {arch.filter_widths} x {arch.num_filters}" if arch else ""
        title = f"demo repository: {name} v{m.manifest.version} ({m.manifest.format}{shape})"
        return BenchModel(m.key, title, m.repo, m.name, m.version_dir, m.embedding_dir, m.manifest)
    return build_random_repo(work / "repo-demo", DEMO_LIKE, texts)
