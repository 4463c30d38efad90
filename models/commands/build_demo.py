"""``textserve build-demo``: train and export the demo model set (see :mod:`models.demo`).

    textserve build-demo [--repo model_repository] [--force] [--quick] [--seed 0]

Trains noun-topic (26 classes), verb-topic (15) and pos (4) on WordNet glosses, sharing the full
GloVe 6B 50d embedding; exports each as version 1 ``stripped`` and version 2 ``frozen``; writes
models.yaml; prints each model's test accuracy beside a TF-IDF + logistic regression baseline
on the same split. An existing repository is refused unless ``--force`` (which deletes it).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from server.errors import ArtifactError


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--repo", type=Path, default=Path("model_repository"))
    parser.add_argument(
        "--force", action="store_true", help="delete and rebuild an existing repository"
    )
    parser.add_argument("--quick", action="store_true", help="the small test repository")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-baseline", action="store_true", help="skip the TF-IDF baseline")


def run(args: argparse.Namespace) -> int:
    from models.tflog import quiet_tensorflow

    quiet_tensorflow()
    repo: Path = args.repo
    if repo.exists() and (not repo.is_dir() or any(repo.iterdir())) and not args.force:
        raise ArtifactError(
            f"{repo} already exists and is not empty; use --force to delete and rebuild it"
        )
    from rich.console import Console
    from rich.table import Table

    from models.baseline import tfidf_logreg
    from models.demo import build_demo

    console = Console(stderr=True)
    report = build_demo(
        repo,
        quick=args.quick,
        seed=args.seed,
        force=args.force,
        bars=True,
        log=console.print,
    )
    table = Table("model", "labels", "train", "test", "CNN test acc", "TF-IDF+LR test acc")
    for m in report.models:
        base = "-" if args.no_baseline else f"{tfidf_logreg(m.dataset).test_accuracy:.4f}"
        table.add_row(
            m.name,
            str(len(m.dataset.labels)),
            str(len(m.dataset.train)),
            str(len(m.dataset.test)),
            f"{m.metrics.get('test_accuracy', float('nan')):.4f}",
            base,
        )
    Console().print(table)
    print(f"repository {report.repo} built in {report.seconds:.1f} s", file=sys.stderr)
    return 0
