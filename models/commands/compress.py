"""``textserve compress``: write a compressed embedding or a pruned model version.

    textserve compress --repo REPO float16 --embedding glove-6b-50d [--use-for MODEL ...]
    textserve compress --repo REPO int8    --embedding glove-6b-50d [--use-for MODEL ...]
    textserve compress --repo REPO vocab   --embedding glove-6b-50d --keep 20000 \\
                                           --corpus wordnet:noun [--corpus more.txt ...]
    textserve compress --repo REPO prune   --model noun --sparsity 0.5 0.8 0.9

Embedding strategies add an entry to models.yaml (``--no-register`` to skip); ``--use-for``
points models at the new copy (their ``embedding:`` override). Each pruning sparsity becomes a
new version directory of the model. One JSON record per artifact is printed (``--json``), or a
table.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from models import compress
from server.artifact import list_versions
from server.errors import UsageError

_TEXT_SUFFIXES = (".txt", ".text")


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--repo", type=Path, required=True, help="model repository directory")
    parser.add_argument("--json", action="store_true", help="print JSON records, one per line")
    sub = parser.add_subparsers(dest="strategy", metavar="STRATEGY", required=True)

    def embedding_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--embedding", required=True, help="source embedding name")
        p.add_argument("--name", help="name of the new embedding (default: derived)")
        p.add_argument(
            "--use-for",
            nargs="+",
            default=[],
            metavar="MODEL",
            help="point these models.yaml models at the new embedding",
        )
        p.add_argument("--overwrite", action="store_true", help="replace an existing artifact")
        p.add_argument(
            "--no-register", action="store_true", help="do not add the embedding to models.yaml"
        )
        p.add_argument("--chunk-rows", type=int, default=compress.DEFAULT_CHUNK_ROWS)

    embedding_args(sub.add_parser("float16", help="float16 copy of a float32 embedding"))
    embedding_args(sub.add_parser("int8", help="int8 copy with per-row scales"))
    vocab = sub.add_parser("vocab", help="keep the N most frequent tokens of a corpus")
    embedding_args(vocab)
    vocab.add_argument("--keep", type=int, required=True, help="tokens to keep (plus PAD, OOV)")
    vocab.add_argument(
        "--corpus",
        nargs="+",
        required=True,
        help="wordnet:noun|verb|pos or a .jsonl/.csv dataset (train split), or a .txt file "
        "(one text per line)",
    )
    vocab.add_argument("--cased", action="store_true", help="do not lower-case the corpus")
    prune = sub.add_parser("prune", help="magnitude-prune a model's kernels (new versions)")
    prune.add_argument("--model", required=True)
    prune.add_argument("--version", type=int, help="source version (default: latest)")
    prune.add_argument("--sparsity", type=float, nargs="+", required=True, help="e.g. 0.5 0.8 0.9")
    prune.add_argument("--scope", choices=("layer", "global"), default="layer")


def corpus_texts(specs: Sequence[str]) -> Iterator[str]:
    """Texts of each corpus: a plain text file line by line, else a dataset's train split."""
    for spec in specs:
        path = Path(spec)
        if path.suffix.lower() in _TEXT_SUFFIXES:
            if not path.is_file():
                raise UsageError(f"{path}: corpus file not found")
            with path.open(encoding="utf-8") as f:
                yield from (line.rstrip("\n") for line in f)
        else:
            from models.data import load_dataset

            yield from load_dataset(spec).train.texts


def _records(args: argparse.Namespace) -> Iterator[dict[str, Any]]:
    repo: Path = args.repo
    if not repo.is_dir():
        raise UsageError(f"{repo}: repository directory not found")
    if args.strategy == "prune":
        if args.version is not None:
            source = args.version
        else:
            versions = list_versions(compress.model_dir(repo, args.model))
            source = max(versions) if versions else None
        for sparsity in args.sparsity:
            yield compress.prune_model(
                repo, args.model, sparsity, version=source, scope=args.scope
            ).record()
        return
    common: dict[str, Any] = {
        "chunk_rows": args.chunk_rows,
        "overwrite": args.overwrite,
        "register": not args.no_register,
        "use_for": tuple(args.use_for),
    }
    if args.strategy == "float16":
        yield compress.to_float16(repo, args.embedding, args.name, **common).record()
    elif args.strategy == "int8":
        yield compress.to_int8(repo, args.embedding, args.name, **common).record()
    else:
        texts = corpus_texts(args.corpus)
        yield compress.prune_vocabulary(
            repo, args.embedding, texts, args.keep, args.name, lowercase=not args.cased, **common
        ).record()


def _mib(n: float) -> str:
    return f"{n / 2**20:.2f} MiB"


def _print_table(records: list[dict[str, Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    if records and records[0]["strategy"] == "weight-prune":
        table = Table("model", "version", "sparsity", "raw", "gzip", "zip", "source gzip")
        for r in records:
            d, s = r["disk_bytes"], r["source_disk_bytes"]
            table.add_row(
                r["model"],
                f"{r['source_version']} → {r['version']}",
                f"{r['sparsity']:.3f}",
                _mib(d["raw"]),
                _mib(d["gzip"]),
                _mib(d["zip"]),
                _mib(s["gzip"]),
            )
    else:
        table = Table("embedding", "dtype", "rows", "RAM", "source RAM", "disk", "sha256")
        for r in records:
            table.add_row(
                r["name"],
                r["dtype"],
                str(r["rows"]),
                _mib(r["ram_bytes"]),
                _mib(r["source_ram_bytes"]),
                _mib(r["disk_bytes"]),
                r["sha256"][:12],
            )
    Console().print(table)


def run(args: argparse.Namespace) -> int:
    records = []
    for record in _records(args):
        records.append(record)
        if args.json:
            print(json.dumps(record), flush=True)
    if not args.json:
        _print_table(records)
    return 0
