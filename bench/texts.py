"""Benchmark inputs: real texts (WordNet glosses) and the request bodies wrk posts.

Short texts are glosses as they are (~10 tokens). Seed-scale texts are cut, 50 tokens
each, from consecutive glosses joined with ``;`` (the seed's texts were paragraphs that long).
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from pathlib import Path

from server.text import tokenize


def gloss_texts(limit: int | None = None) -> list[str]:
    """WordNet glosses (every part of speech), in the dataset's fixed order."""
    from models.data import load_wordnet

    data = load_wordnet("pos")
    texts = [*data.train.texts, *data.validation.texts, *data.test.texts]
    return texts[:limit] if limit else texts


def joined_texts(texts: Sequence[str], tokens: int, count: int) -> list[str]:
    """``count`` texts of exactly ``tokens`` tokens, cut from consecutive ``texts`` joined."""
    out: list[str] = []
    pending: list[str] = []
    i = 0
    while len(out) < count:
        if i >= 2 * len(texts) + 10 * count * tokens:
            raise ValueError("texts hold too few tokens")
        pending.extend(tokenize(texts[i % len(texts)]))
        pending.append(";")
        i += 1
        while len(pending) >= tokens and len(out) < count:
            out.append(" ".join(pending[:tokens]))
            pending = pending[tokens:]
    return out


def mean_tokens(texts: Sequence[str]) -> float:
    return sum(len(tokenize(t)) for t in texts) / max(len(texts), 1)


def write_bodies(
    path: Path, texts: Sequence[str], per_request: int, count: int, seed: int = 0
) -> Path:
    """``count`` JSON bodies ``{"texts": [...]}`` of ``per_request`` texts each, one per line."""
    rng = random.Random(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for _ in range(count):
            body = {"texts": [rng.choice(texts) for _ in range(per_request)]}
            f.write(json.dumps(body, ensure_ascii=False, separators=(",", ":")) + "\n")
    return path
