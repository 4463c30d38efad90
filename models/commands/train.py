"""``textserve train``: train the shallow CNN on a dataset.

    textserve train --data wordnet:noun --embedding REPO/embeddings/glove-6b-50d --out runs/noun
    textserve train --data mine.csv --text-field body --label-field topic \\
                    --embedding glove-6b-50d --repo model_repository --name topics
    textserve train --data wordnet:noun --embedding glove-6b-50d --repo REPO --name noun-topic \\
                    --init-from seed/model.pb          # continue from a frozen graph's weights

``--out DIR`` receives the full training checkpoint (``model.ckpt.*``, what
``tf.compat.v1.train.Saver()`` writes, with Adam slots and meta graph) and its ``model.json``:
the input of ``textserve export``. With ``--repo``/``--name`` the model is also exported into
the repository (``--formats``, default ``stripped``) as new version(s) and added to models.yaml.
``--embedding`` is an embedding directory, or a name under ``REPO/embeddings/``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from models.train import TrainConfig
from server.artifact import ModelFormat
from server.errors import UsageError

DEFAULTS = TrainConfig()


def _widths(text: str) -> tuple[int, ...]:
    try:
        widths = tuple(int(w) for w in text.replace(",", " ").split())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not a list of integers: {text!r}") from exc
    if not widths or min(widths) < 1:
        raise argparse.ArgumentTypeError("filter widths must be positive integers")
    return widths


def configure(parser: argparse.ArgumentParser) -> None:
    d = parser.add_argument_group("data")
    d.add_argument("--data", required=True, help="wordnet:noun|verb|pos, or a .jsonl / .csv file")
    d.add_argument("--text-field", default="text", help="JSONL field / CSV column of the text")
    d.add_argument("--label-field", default="label", help="JSONL field / CSV column of the label")
    d.add_argument(
        "--examples", action="store_true", help="WordNet: keep the glosses' example sentences"
    )
    parser.add_argument(
        "--embedding", required=True, help="embedding directory, or its name in --repo"
    )
    o = parser.add_argument_group("output")
    o.add_argument("--out", type=Path, help="directory for the full training checkpoint")
    o.add_argument("--repo", type=Path, help="model repository to export into")
    o.add_argument("--name", help="model name in the repository")
    o.add_argument(
        "--formats",
        default="stripped",
        help="formats to export into --repo, comma-separated (default: stripped)",
    )
    o.add_argument("--force", action="store_true", help="replace an existing --out directory")
    h = parser.add_argument_group("hyper-parameters")
    h.add_argument("--filter-widths", type=_widths, default=DEFAULTS.filter_widths)
    h.add_argument("--num-filters", type=int, default=DEFAULTS.num_filters)
    h.add_argument("--epochs", type=int, default=DEFAULTS.epochs)
    h.add_argument("--batch-size", type=int, default=DEFAULTS.batch_size)
    h.add_argument("--learning-rate", type=float, default=DEFAULTS.learning_rate)
    h.add_argument("--dropout-keep-prob", type=float, default=DEFAULTS.dropout_keep_prob)
    h.add_argument("--l2", type=float, default=DEFAULTS.l2)
    h.add_argument("--patience", type=int, default=DEFAULTS.patience)
    h.add_argument("--max-len", type=int, default=DEFAULTS.max_len)
    h.add_argument(
        "--trainable-embedding",
        action="store_true",
        help="fine-tune the embedding too (it is then written as a new embedding artifact)",
    )
    h.add_argument("--seed", type=int, default=DEFAULTS.seed)
    h.add_argument("--threads", type=int, default=DEFAULTS.threads)
    parser.add_argument(
        "--init-from",
        type=Path,
        metavar="PATH.pb",
        help="start from the weights of a frozen graph (architecture taken from it)",
    )


def parse_formats(text: str) -> list[ModelFormat]:
    out: list[ModelFormat] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        if part == "all":
            from models.export import EXPORT_FORMATS

            out.extend(f for f in EXPORT_FORMATS if f not in out)
            continue
        try:
            out.append(ModelFormat(part))
        except ValueError as exc:
            choices = ", ".join(f.value for f in ModelFormat)
            raise UsageError(f"unknown format {part!r} (one of: {choices}, all)") from exc
    if not out:
        raise UsageError("no export format given")
    return out


def run(args: argparse.Namespace) -> int:
    from models.tflog import quiet_tensorflow

    quiet_tensorflow()
    if args.out is None and args.repo is None:
        raise UsageError("give --out DIR and/or --repo REPO --name NAME")
    if (args.repo is None) != (args.name is None):
        raise UsageError("--repo and --name go together")
    formats = parse_formats(args.formats) if args.repo is not None else []

    from models.data import load_dataset
    from models.workflow import resolve_embedding, train_and_save

    dataset = load_dataset(args.data, args.text_field, args.label_field, examples=args.examples)
    embedding = resolve_embedding(args.embedding, args.repo)
    config = TrainConfig(
        filter_widths=args.filter_widths,
        num_filters=args.num_filters,
        epochs=args.epochs,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        dropout_keep_prob=args.dropout_keep_prob,
        l2=args.l2,
        patience=args.patience,
        trainable_embedding=args.trainable_embedding,
        max_len=args.max_len,
        seed=args.seed,
        threads=args.threads,
    )
    result = train_and_save(
        dataset,
        embedding,
        config,
        out=args.out,
        repo=args.repo,
        name=args.name,
        formats=formats,
        init_from=args.init_from,
        force=args.force,
        log=lambda msg: print(msg, file=sys.stderr),
    )
    from models.commands.export import print_exports

    m = result.model.metrics

    def acc(key: str) -> str:
        return f"{m[key]:.4f}" if key in m else "n/a (empty split)"

    print(
        f"{dataset.name}: {len(dataset.labels)} labels, {len(dataset.train)} training texts; "
        f"validation accuracy {acc('val_accuracy')}, test accuracy {acc('test_accuracy')}"
    )
    if result.exports:
        print_exports(result.exports)
    return 0
