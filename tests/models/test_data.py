"""Datasets: WordNet label counts, cleaning, de-duplication, deterministic split, user files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from models.data import (
    NOUN_TOPICS,
    POS_LABELS,
    VERB_TOPICS,
    build_dataset,
    load_csv,
    load_dataset,
    load_jsonl,
    load_wordnet,
    parse_gloss_line,
    split_of,
)
from server.errors import ArtifactError, UsageError


@pytest.fixture(scope="module")
def wordnet() -> dict[str, object]:
    return {task: load_wordnet(task) for task in ("noun", "verb", "pos")}


def test_label_counts(wordnet: dict[str, object]) -> None:
    from models.data import Dataset

    noun, verb, pos = (wordnet[t] for t in ("noun", "verb", "pos"))
    assert isinstance(noun, Dataset)
    assert isinstance(verb, Dataset)
    assert isinstance(pos, Dataset)
    assert len(noun.labels) == 26
    assert noun.labels == NOUN_TOPICS
    assert len(verb.labels) == 15
    assert verb.labels == VERB_TOPICS
    assert pos.labels == POS_LABELS
    # Every label occurs, and the sets are large (WordNet 3.0: 82k noun, 13.7k verb synsets).
    for ds in (noun, verb, pos):
        assert min(ds.counts().values()) > 0
    assert 75_000 < sum(noun.counts().values()) <= 82_115
    assert 12_000 < sum(verb.counts().values()) <= 13_767
    assert sum(pos.counts().values()) > 110_000
    # 80/10/10 by hash, roughly.
    total = len(noun.train) + len(noun.validation) + len(noun.test)
    assert 0.78 < len(noun.train) / total < 0.82
    assert 0.09 < len(noun.test) / total < 0.11


def test_no_text_in_two_splits_and_no_duplicates(wordnet: dict[str, object]) -> None:
    from models.data import Dataset

    ds = wordnet["pos"]
    assert isinstance(ds, Dataset)
    train, val, test = (set(s.texts) for s in (ds.train, ds.validation, ds.test))
    assert not train & val
    assert not train & test
    assert not val & test
    assert len(train) == len(ds.train.texts)
    for name, s in (("train", ds.train), ("validation", ds.validation), ("test", ds.test)):
        assert all(split_of(t) == name for t in s.texts[:500])
    assert not any('"' in t[:1] for t in ds.train.texts)


def test_split_is_a_function_of_the_text_only() -> None:
    texts = [f"text number {i}" for i in range(300)]
    pairs = [(t, "a" if i % 2 else "b") for i, t in enumerate(texts)]
    full = build_dataset("x", pairs)
    half = build_dataset("x", [*pairs[::2], ("a b c", "a")])
    for name in ("train", "validation", "test"):
        sub = set(getattr(half, name).texts) - {"a b c"}
        assert sub <= set(getattr(full, name).texts)
    assert [split_of("hello") for _ in range(3)] == [split_of("hello")] * 3
    assert build_dataset("x", pairs).train.texts == full.train.texts


def test_dedup_and_conflicts() -> None:
    pairs = [
        ("the  same text", "a"),
        ("the same text ", "a"),  # same after whitespace clean-up: kept once
        ("ambiguous", "a"),
        ("ambiguous", "b"),  # conflicting labels: dropped altogether
        ("only b", "b"),
        ("   ", "a"),  # empty: dropped
    ]
    ds = build_dataset("x", pairs)
    texts = ds.train.texts + ds.validation.texts + ds.test.texts
    assert sorted(texts) == ["only b", "the same text"]
    assert ds.labels == ("a", "b")
    assert ds.counts() == {"a": 1, "b": 1}


def test_gloss_parsing_strips_examples() -> None:
    line = (
        "00022316 29 v 05 sedate 0 calm 0 tranquilize 0 tranquillize 0 tranquillise 0 000 "
        "| cause to be calm or quiet as by administering a sedative to; "
        '"The patient must be sedated before the operation"  \n'
    )
    assert parse_gloss_line(line) == (
        29,
        "v",
        "cause to be calm or quiet as by administering a sedative to",
    )
    lex, _, with_examples = parse_gloss_line(line, examples=True)
    assert "patient" in with_examples
    assert lex == 29
    with pytest.raises(ArtifactError):
        parse_gloss_line("  1 This software and database is being provided")


def test_jsonl_and_csv(tmp_path: Path) -> None:
    rows = [{"body": f"text {i}", "cls": "pos" if i % 3 else "neg"} for i in range(40)]
    jl = tmp_path / "d.jsonl"
    jl.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n", encoding="utf-8")
    ds = load_jsonl(jl, text_field="body", label_field="cls")
    assert ds.labels == ("neg", "pos")
    assert sum(ds.counts().values()) == 40
    csv_path = tmp_path / "d.csv"
    csv_path.write_text("body,cls\n" + "".join(f'"{r["body"]}, ok",{r["cls"]}\n' for r in rows))
    ds2 = load_dataset(str(csv_path), text_field="body", label_field="cls")
    assert sum(ds2.counts().values()) == 40
    assert load_dataset(str(jl), "body", "cls").train.texts == ds.train.texts
    tsv_path = tmp_path / "d.tsv"  # tab-separated: commas are part of the text
    tsv_path.write_text("body\tcls\n" + "".join(f"{r['body']}, ok\t{r['cls']}\n" for r in rows))
    ds3 = load_dataset(str(tsv_path), text_field="body", label_field="cls")
    assert ds3.train.texts == ds2.train.texts
    assert ds3.counts() == ds2.counts()


def test_bad_input(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="not found"):
        load_jsonl(tmp_path / "missing.jsonl")
    with pytest.raises(ArtifactError, match="not found"):
        load_dataset(str(tmp_path / "missing.csv"))
    p = tmp_path / "d.csv"
    p.write_text("text,category\nhello,a\n")
    with pytest.raises(UsageError, match="no column 'label'"):
        load_csv(p)
    empty = tmp_path / "e.jsonl"
    empty.write_text("\n")
    with pytest.raises(ArtifactError, match="empty"):
        load_jsonl(empty)
    j = tmp_path / "j.jsonl"
    j.write_text('{"text": "x", "category": "a"}\n')
    with pytest.raises(UsageError, match="no field 'label'"):
        load_jsonl(j)
    one = tmp_path / "one.jsonl"
    one.write_text('{"text": "x", "label": "a"}\n{"text": "y", "label": "a"}\n')
    with pytest.raises(ArtifactError, match="fewer than two labels"):
        load_jsonl(one)
    with pytest.raises(UsageError, match="unknown WordNet task"):
        load_dataset("wordnet:adverbs")
    with pytest.raises(ArtifactError, match="wordnet-base"):
        load_wordnet("noun", wordnet_dir=tmp_path)
