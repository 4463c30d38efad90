"""``textserve export``: export a training run in every format, and show what each costs on disk.

    textserve export --run runs/noun --repo model_repository --name noun-topic
    textserve export --run runs/noun --repo REPO --name noun-topic --formats stripped,frozen

Each format becomes the next version directory of ``REPO/<name>/`` (``--formats all`` by
default: checkpoint, stripped, frozen, frozen-selfcontained, savedmodel). The embedding is the
one recorded in the run's model.json, looked up in ``REPO/embeddings/`` (``--embedding`` to
give another directory). Servable formats add the model to models.yaml.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from models.commands.train import parse_formats
from models.export import Exported


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--run", type=Path, required=True, help="training run directory (textserve train --out)"
    )
    parser.add_argument("--repo", type=Path, required=True, help="model repository")
    parser.add_argument("--name", required=True, help="model name in the repository")
    parser.add_argument("--formats", default="all", help="comma-separated formats, or 'all'")
    parser.add_argument("--embedding", help="embedding directory or name (default: the run's)")


def print_exports(exports: Sequence[Exported]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table("format", "version", "files", "bytes on disk", title="exported")
    for e in exports:
        files = ", ".join(sorted(e.files))
        table.add_row(e.format.value, str(e.manifest.version), files, f"{e.bytes:,}")
    Console(width=max(Console().width, 120)).print(table)


def run(args: argparse.Namespace) -> int:
    from models.tflog import quiet_tensorflow

    quiet_tensorflow()
    from models.workflow import export_run

    formats = parse_formats(args.formats)
    exports = export_run(
        args.run,
        args.repo,
        args.name,
        formats,
        embedding=args.embedding,
        log=lambda msg: print(msg, file=sys.stderr),
    )
    print_exports(exports)
    return 0
