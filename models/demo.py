"""The demo model set: three WordNet gloss classifiers sharing one GloVe embedding.

=============  ============================  ======
model          task                          labels
=============  ============================  ======
``noun-topic``  noun gloss → lexicographer file  26
``verb-topic``  verb gloss → lexicographer file  15
``pos``         any gloss → part of speech        4
=============  ============================  ======

Each model is exported twice with the same weights: version 1 ``stripped`` (checkpoint of the
model's own variables) and version 2 ``frozen`` (embedding-external GraphDef). ``models.yaml``
lists the three models with ``version_policy: all`` (both versions served) and format left to
each version's ``model.json``, plus the one shared embedding.

``build_repository(repo)`` (``textserve build-demo``) uses the full GloVe 6B 50d embedding
(400 002 rows) and the full datasets. ``quick=True`` is the test fixture: small samples, a
vocabulary-subset embedding, fewer filters, two epochs.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from models.data import Dataset, load_wordnet
from models.embeddings import (
    GLOVE_NAME,
    EmbeddingArtifact,
    embedding_dir,
    load_glove,
    write_glove,
)
from models.export import Exported, export
from models.train import TrainConfig, Trainer
from server.artifact import (
    EMBEDDINGS_DIR,
    MODELS_YAML,
    EmbeddingConfig,
    ModelConfig,
    ModelFormat,
    RepositoryConfig,
    write_repository_config,
)
from server.errors import ArtifactError
from server.text import tokenize

# model name → WordNet task
DEMO_MODELS: dict[str, str] = {"noun-topic": "noun", "verb-topic": "verb", "pos": "pos"}
DEMO_VERSIONS: dict[int, ModelFormat] = {1: ModelFormat.STRIPPED, 2: ModelFormat.FROZEN}
QUICK_EMBEDDING = "glove-6b-50d-subset"
QUICK_TOP_WORDS = 20_000
UNLISTED_DIR = "unlisted"
SELFCONTAINED_MODEL = "noun-topic-selfcontained"
"""Quick repo only: ``unlisted/noun-topic-selfcontained/1`` (not in models.yaml)."""

# Sample sizes (train, validation, test) for quick mode.
QUICK_SIZES: dict[str, tuple[int, int, int]] = {
    "noun-topic": (2000, 300, 300),
    "verb-topic": (1500, 300, 300),
    "pos": (2000, 300, 300),
}
QUICK_CONFIG = TrainConfig(num_filters=32, epochs=2, learning_rate=3e-3, patience=1)
FULL_CONFIG: dict[str, TrainConfig] = {
    # 65k glosses: ~0.79 test accuracy after 7-8 epochs (20 s/epoch on 2 busy cores).
    "noun-topic": TrainConfig(num_filters=256, batch_size=128, learning_rate=2e-3, epochs=8),
    "verb-topic": TrainConfig(num_filters=256, batch_size=64, learning_rate=2e-3, epochs=10),
    "pos": TrainConfig(num_filters=128, batch_size=128, learning_rate=2e-3, epochs=3),
}


@dataclass
class DemoModel:
    name: str
    dataset: Dataset
    exports: list[Exported] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0


@dataclass
class DemoReport:
    repo: Path
    embedding: EmbeddingArtifact
    models: list[DemoModel]
    seconds: float
    selfcontained: Exported | None = None


def load_demo_datasets(quick: bool) -> dict[str, Dataset]:
    out = {}
    for name, task in DEMO_MODELS.items():
        ds = load_wordnet(task)
        out[name] = ds.subset(*QUICK_SIZES[name]) if quick else ds
    return out


def build_demo(
    repo: Path,
    *,
    quick: bool = False,
    seed: int = 0,
    force: bool = False,
    bars: bool = False,
    log: Callable[[str], None] | None = None,
) -> DemoReport:
    """Train, export and write ``models.yaml``. Refuses an existing repository unless ``force``."""
    started = time.monotonic()
    repo = Path(repo)
    say = log or (lambda _msg: None)
    if (repo / MODELS_YAML).exists() or (repo.exists() and any(repo.iterdir())):
        if not force:
            raise ArtifactError(f"{repo} already exists; use --force to rebuild it")
        shutil.rmtree(repo)
    repo.mkdir(parents=True, exist_ok=True)

    datasets = load_demo_datasets(quick)
    glove = load_glove()
    if quick:
        words = {t for ds in datasets.values() for s in (ds.train, ds.validation, ds.test)
                 for text in s.texts for t in tokenize(text)}  # fmt: skip
        emb_name = QUICK_EMBEDDING
        embedding = write_glove(
            embedding_dir(repo, emb_name), emb_name, glove, keep=words, top=QUICK_TOP_WORDS
        )
    else:
        emb_name = GLOVE_NAME
        embedding = write_glove(embedding_dir(repo, emb_name), emb_name, glove)
    say(f"embedding {emb_name}: {embedding.manifest.rows} x {embedding.manifest.dim}")

    report = DemoReport(repo, embedding, [], 0.0)
    configs: list[ModelConfig] = []
    for name, ds in datasets.items():
        t0 = time.monotonic()
        base = QUICK_CONFIG if quick else FULL_CONFIG[name]
        config = replace(base, seed=seed)
        demo = DemoModel(name, ds)
        with Trainer(embedding, ds.labels, config) as trainer:
            model = trainer.fit_with_bar(ds, name) if bars else trainer.fit(ds)
        for version, fmt in DEMO_VERSIONS.items():
            demo.exports.append(export(model, fmt, repo / name / str(version), name, version))
        if quick and name == "noun-topic":
            report.selfcontained = export(
                model,
                ModelFormat.FROZEN_SELFCONTAINED,
                repo / UNLISTED_DIR / SELFCONTAINED_MODEL / "1",
                SELFCONTAINED_MODEL,
                1,
            )
        demo.metrics = dict(model.metrics)
        demo.seconds = time.monotonic() - t0
        report.models.append(demo)
        configs.append(ModelConfig(name=name, base_path=name, version_policy="all"))
        say(f"{name}: test accuracy {model.metrics.get('test_accuracy', float('nan')):.4f}")

    write_repository_config(
        repo,
        RepositoryConfig(
            models=tuple(configs),
            embeddings=(EmbeddingConfig(name=emb_name, path=f"{EMBEDDINGS_DIR}/{emb_name}"),),
        ),
    )
    report.seconds = time.monotonic() - started
    return report


def build_repository(repo: Path, *, quick: bool = False, seed: int = 0) -> Path:
    """Build the demo model repository at ``repo`` and return it.

    Contents (both modes)::

        repo/models.yaml                       3 models, version_policy "all", 1 embedding
        repo/embeddings/<emb>/                 float32 GloVe 6B 50d rows (shared by all models)
        repo/noun-topic/1  stripped  26 labels (noun.Tops … noun.time)
        repo/noun-topic/2  frozen    same weights as version 1 (embedding-external)
        repo/verb-topic/1  stripped  15 labels (verb.body … verb.weather)
        repo/verb-topic/2  frozen
        repo/pos/1         stripped   4 labels (adj, adv, noun, verb)
        repo/pos/2         frozen

    ``quick=True`` (tests): ``<emb>`` is ``glove-6b-50d-subset`` (the 20 000 most frequent GloVe
    words + every word of the sampled glosses, ~22k rows, vectors identical to GloVe's);
    samples of 2000/1500/2000 training glosses, 32 filters of widths 1, 2, 3, two epochs
    (accuracies are low but above chance). It also writes
    ``repo/unlisted/noun-topic-selfcontained/1`` (``frozen-selfcontained``, the same weights as
    noun-topic v1/v2, with its own vocab.txt; *not* listed in models.yaml).

    ``quick=False`` (``textserve build-demo``): ``<emb>`` is ``glove-6b-50d`` (400 002 rows),
    full datasets, tuned hyper-parameters (see ``FULL_CONFIG``).

    The repository must not exist yet (or be empty).
    """
    return build_demo(repo, quick=quick, seed=seed).repo
