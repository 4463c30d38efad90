"""Labelled text datasets: WordNet glosses (the demo set) and the user's own JSONL/CSV files.

WordNet (Debian ``wordnet-base``, ``/usr/share/wordnet/data.{noun,verb,adj,adv}``):

* ``noun``: noun glosses labelled by lexicographer file (26 topics, ``noun.Tops`` … ``noun.time``);
* ``verb``: verb glosses labelled by lexicographer file (15 topics, ``verb.body`` …
  ``verb.weather``);
* ``pos``:  every gloss labelled by part of speech (``adj``, ``adv``, ``noun``, ``verb``; adjective
  satellites ``s`` count as ``adj``).

The text is the gloss after ``"| "`` with its example sentences removed: WordNet appends
examples as ``; "quoted sentence"`` and they often contain the very word being defined, which
makes them a different task (we classify definitions). The license header (lines starting with
two spaces) is skipped.

Every dataset is cleaned the same way: whitespace collapsed, empty texts dropped, identical texts
de-duplicated (one copy kept), and texts that occur with *conflicting* labels dropped altogether.
The split is a pure function of the text: ``sha1(text)`` read as an integer, modulo 100, below
80 → train, below 90 → validation, else test. Adding or removing other examples never moves a
text from one split to another.
"""

from __future__ import annotations

import csv
import hashlib
import json
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from server.errors import ArtifactError, UsageError

WORDNET_DIR = Path("/usr/share/wordnet")

# WordNet 3.0 lexicographer files, by lex_filenum (lexnames(5WN)).
LEXNAMES: tuple[str, ...] = (
    "adj.all", "adj.pert", "adv.all", "noun.Tops", "noun.act", "noun.animal", "noun.artifact",
    "noun.attribute", "noun.body", "noun.cognition", "noun.communication", "noun.event",
    "noun.feeling", "noun.food", "noun.group", "noun.location", "noun.motive", "noun.object",
    "noun.person", "noun.phenomenon", "noun.plant", "noun.possession", "noun.process",
    "noun.quantity", "noun.relation", "noun.shape", "noun.state", "noun.substance", "noun.time",
    "verb.body", "verb.change", "verb.cognition", "verb.communication", "verb.competition",
    "verb.consumption", "verb.contact", "verb.creation", "verb.emotion", "verb.motion",
    "verb.perception", "verb.possession", "verb.social", "verb.stative", "verb.weather",
    "adj.ppl",
)  # fmt: skip
NOUN_TOPICS = tuple(n for n in LEXNAMES if n.startswith("noun."))
VERB_TOPICS = tuple(n for n in LEXNAMES if n.startswith("verb."))
POS_LABELS = ("adj", "adv", "noun", "verb")
_POS_OF_TYPE = {"n": "noun", "v": "verb", "a": "adj", "s": "adj", "r": "adv"}
WORDNET_TASKS = ("noun", "verb", "pos")

SPLITS = ("train", "validation", "test")
_WS = re.compile(r"\s+")
_EXAMPLE = re.compile(r';\s*"|^\s*"')

LabelArray = npt.NDArray[np.int32]


@dataclass(frozen=True)
class Split:
    texts: tuple[str, ...]
    y: LabelArray
    """Label ids (indices into :attr:`Dataset.labels`), int32."""

    def __len__(self) -> int:
        return len(self.texts)

    def head(self, n: int) -> Split:
        return Split(self.texts[:n], self.y[:n])


@dataclass(frozen=True)
class Dataset:
    name: str
    labels: tuple[str, ...]
    """Every label of the task, sorted (a model has one output per label)."""
    train: Split
    validation: Split
    test: Split

    def split(self, name: str) -> Split:
        if name not in SPLITS:
            raise UsageError(f"unknown split {name!r} (one of {', '.join(SPLITS)})")
        result: Split = getattr(self, name)
        return result

    def counts(self) -> dict[str, int]:
        """Examples per label over all splits."""
        total = np.zeros(len(self.labels), dtype=np.int64)
        for s in (self.train, self.validation, self.test):
            total += np.bincount(s.y, minlength=len(self.labels))
        return {label: int(c) for label, c in zip(self.labels, total, strict=True)}

    def subset(self, train: int, validation: int, test: int) -> Dataset:
        """The first examples of each split (splits are in hash order, so this is a fair sample)."""
        return Dataset(
            self.name,
            self.labels,
            self.train.head(train),
            self.validation.head(validation),
            self.test.head(test),
        )


def split_of(text: str) -> str:
    """``train`` / ``validation`` / ``test`` (80/10/10) from the sha1 of the text: never changes."""
    return _split_of_digest(hashlib.sha1(text.encode("utf-8")).digest())


def _split_of_digest(digest: bytes) -> str:
    bucket = int.from_bytes(digest[:8], "big") % 100
    if bucket < 80:
        return "train"
    return "validation" if bucket < 90 else "test"


def clean_text(text: str) -> str:
    return _WS.sub(" ", text).strip()


def build_dataset(
    name: str,
    pairs: Iterable[tuple[str, str]],
    labels: Sequence[str] | None = None,
) -> Dataset:
    """De-duplicate, drop conflicting texts, split by hash. ``labels`` fixes the label set."""
    seen: dict[str, str | None] = {}
    for raw_text, label in pairs:
        text = clean_text(raw_text)
        if not text:
            continue
        prev = seen.get(text, label)
        seen[text] = label if prev == label else None  # None marks a conflict
    kept = {t: lab for t, lab in seen.items() if lab is not None}
    if not kept:
        raise ArtifactError(f"dataset {name!r} is empty (no labelled texts)")
    label_set = tuple(sorted(set(kept.values()))) if labels is None else tuple(labels)
    if len(label_set) < 2:
        raise ArtifactError(f"dataset {name!r} has fewer than two labels: {list(label_set)}")
    index = {lab: i for i, lab in enumerate(label_set)}
    unknown = sorted(set(kept.values()) - index.keys())
    if unknown:
        raise ArtifactError(f"dataset {name!r}: labels outside the label set: {unknown[:5]}")
    parts: dict[str, list[tuple[bytes, str, int]]] = {s: [] for s in SPLITS}
    for text, label in kept.items():
        digest = hashlib.sha1(text.encode("utf-8")).digest()
        parts[_split_of_digest(digest)].append((digest, text, index[label]))
    splits = []
    for s in SPLITS:
        rows = sorted(parts[s])  # hash order: deterministic and label-shuffled
        splits.append(
            Split(tuple(r[1] for r in rows), np.array([r[2] for r in rows], dtype=np.int32))
        )
    return Dataset(name, label_set, *splits)


# ---------------------------------------------------------------------------------------------
# WordNet


def _wordnet_lines(path: Path) -> Iterator[str]:
    try:
        with path.open(encoding="utf-8") as f:
            for line in f:
                if not line.startswith("  ") and line.strip():
                    yield line
    except FileNotFoundError as exc:
        raise ArtifactError(f"{path}: not found (install the Debian package wordnet-base)") from exc


def parse_gloss_line(line: str, examples: bool = False) -> tuple[int, str, str]:
    """``(lex_filenum, ss_type, gloss)`` of one ``data.*`` line."""
    head, sep, gloss = line.partition("| ")
    fields = head.split()
    if not sep or len(fields) < 3:
        raise ArtifactError(f"not a WordNet data line: {line[:60]!r}")
    gloss = gloss.strip()
    if not examples:
        m = _EXAMPLE.search(gloss)
        if m:
            gloss = gloss[: m.start()]
    return int(fields[1]), fields[2], gloss.strip().rstrip(";").strip()


def wordnet_pairs(
    task: str, wordnet_dir: Path = WORDNET_DIR, examples: bool = False
) -> Iterator[tuple[str, str]]:
    """``(gloss, label)`` pairs for ``task`` in ``noun`` / ``verb`` / ``pos``."""
    if task not in WORDNET_TASKS:
        raise UsageError(f"unknown WordNet task {task!r} (one of {', '.join(WORDNET_TASKS)})")
    files = {"noun": ["noun"], "verb": ["verb"], "pos": ["adj", "adv", "noun", "verb"]}[task]
    for part in files:
        for line in _wordnet_lines(Path(wordnet_dir) / f"data.{part}"):
            lex, ss_type, gloss = parse_gloss_line(line, examples)
            if task == "pos":
                yield gloss, _POS_OF_TYPE[ss_type]
            else:
                yield gloss, LEXNAMES[lex]


def load_wordnet(task: str, wordnet_dir: Path = WORDNET_DIR, examples: bool = False) -> Dataset:
    labels = {"noun": NOUN_TOPICS, "verb": VERB_TOPICS, "pos": POS_LABELS}.get(task)
    pairs = wordnet_pairs(task, wordnet_dir, examples)
    return build_dataset(f"wordnet:{task}", pairs, labels)


# ---------------------------------------------------------------------------------------------
# The user's own data


def _require_file(path: Path) -> None:
    if not path.exists():
        raise ArtifactError(f"{path}: dataset file not found")
    if not path.is_file():
        raise ArtifactError(f"{path}: not a file")


def load_jsonl(path: Path, text_field: str = "text", label_field: str = "label") -> Dataset:
    """One JSON object per line; blank lines are skipped. Labels are converted with ``str``."""
    path = Path(path)
    _require_file(path)
    pairs: list[tuple[str, str]] = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ArtifactError(f"{path}:{lineno}: not valid JSON: {exc.msg}") from exc
            if not isinstance(obj, dict):
                raise ArtifactError(f"{path}:{lineno}: expected a JSON object")
            for field in (text_field, label_field):
                if field not in obj:
                    raise UsageError(
                        f"{path}:{lineno}: no field {field!r} (fields: {', '.join(sorted(obj))})"
                    )
            text = obj[text_field]
            if not isinstance(text, str):
                raise ArtifactError(f"{path}:{lineno}: field {text_field!r} is not a string")
            pairs.append((text, str(obj[label_field])))
    return build_dataset(str(path), pairs)


def load_csv(path: Path, text_column: str = "text", label_column: str = "label") -> Dataset:
    """A CSV file (tab-separated if it is named ``*.tsv``) with a header row naming
    ``text_column`` and ``label_column``."""
    path = Path(path)
    _require_file(path)
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f, delimiter=delimiter)
        columns = reader.fieldnames or []
        for column in (text_column, label_column):
            if column not in columns:
                raise UsageError(
                    f"{path}: no column {column!r} (columns: {', '.join(columns) or 'none'})"
                )
        pairs = [(row[text_column] or "", row[label_column] or "") for row in reader]
    return build_dataset(str(path), [(t, lab) for t, lab in pairs if lab.strip()])


def load_dataset(
    spec: str,
    text_field: str = "text",
    label_field: str = "label",
    examples: bool = False,
) -> Dataset:
    """``wordnet:noun|verb|pos``, or a ``.jsonl``/``.json``/``.ndjson``/``.csv``/``.tsv`` path."""
    if spec.startswith("wordnet:"):
        return load_wordnet(spec.removeprefix("wordnet:"), examples=examples)
    path = Path(spec)
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json", ".ndjson"):
        return load_jsonl(path, text_field, label_field)
    if suffix in (".csv", ".tsv"):
        return load_csv(path, text_field, label_field)
    _require_file(path)
    raise UsageError(f"{path}: unknown dataset type (use .jsonl or .csv, or wordnet:noun|verb|pos)")
