"""``max_in_flight`` from settings / models.yaml reaches each version's batcher and is obeyed."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from server.artifact import load_repository_config
from server.dataplane import DataPlane
from server.errors import ConfigError
from server.registry import Registry
from server.settings import Settings
from server.text import BATCH_MIN_TEXTS
from tests.server.conftest import copy_repo
from tests.server.test_registry import only, settings, with_registry

TEXT = "a small dog that barks"


WORDS = [
    "a",
    "small",
    "dog",
    "that",
    "barks",
    "to",
    "run",
    "quickly",
    "very",
    "slowly",
    "and",
    "carefully",
    "indeed",
]


def mixed_texts(n: int = 40) -> list[str]:
    """``n`` short texts of varied lengths, one empty and one non-ASCII among them."""
    texts = [" ".join(WORDS[i % 7 : i % 7 + 1 + i % 9]) for i in range(n)]
    texts[3] = ""
    texts[9] = "Café-au-lait, naïve DOG"
    return texts


@pytest.fixture
def repo(small_repo: Path, tmp_path: Path) -> Path:
    return copy_repo(small_repo, tmp_path / "repo")


def test_setting_reads_the_environment_and_rejects_zero(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings(_env_file=None).max_in_flight == 1
    monkeypatch.setenv("TEXTSERVE_MAX_IN_FLIGHT", "3")
    assert Settings(_env_file=None).max_in_flight == 3
    monkeypatch.setenv("TEXTSERVE_MAX_IN_FLIGHT", "0")
    with pytest.raises(ValidationError):
        Settings(_env_file=None)


async def _concurrent_predicts(registry: Registry, name: str) -> int:
    """Batches handed to threads right after a lone text and then a full batch were submitted.

    The lone text starts at once (idle model); the full batch may start beside it only if the
    version allows two predicts in flight, or be staged behind it (``stage_full_batches``).
    Both submits run in one loop iteration, before any predict's completion callback can run,
    so the count does not depend on timing.
    """
    mv = registry.get(name)
    assert mv.batcher is not None
    full = [TEXT] * mv.batching.max_batch_size
    first = asyncio.create_task(registry_classify(registry, name, [TEXT]))
    second = asyncio.create_task(registry_classify(registry, name, full))
    await asyncio.sleep(0)
    running = mv.batcher.in_flight
    probs = await asyncio.gather(first, second)
    assert [len(p) for p in probs] == [1, len(full)]
    return running


async def registry_classify(registry: Registry, name: str, texts: list[str]) -> list[object]:
    mv = registry.get(name)
    assert mv.batcher is not None
    return list(await mv.batcher.submit(texts))


def test_models_yaml_overrides_the_server_default_and_the_batcher_obeys(repo: Path) -> None:
    only(
        repo,
        pos={"base_path": "pos", "batching": {"max_in_flight": 2, "max_batch_size": 8}},
        noun={"base_path": "noun-topic", "batching": {"max_batch_size": 8}},
    )

    async def body(registry: Registry) -> None:
        pos, noun = registry.get("pos"), registry.get("noun")
        assert pos.batching.max_in_flight == 2
        assert noun.batching.max_in_flight == 1
        assert await _concurrent_predicts(registry, "pos") == 2
        assert await _concurrent_predicts(registry, "noun") == 1

    with_registry(settings(repo, max_wait_ms=0.0, stage_full_batches=False), body)


def test_a_full_batch_is_staged_by_default(repo: Path) -> None:
    only(repo, noun={"base_path": "noun-topic", "batching": {"max_batch_size": 8}})

    async def body(registry: Registry) -> None:
        assert await _concurrent_predicts(registry, "noun") == 2  # one running + one staged

    with_registry(settings(repo, max_wait_ms=0.0), body)


def test_server_setting_is_the_default_for_every_model(repo: Path) -> None:
    only(repo, noun={"base_path": "noun-topic", "batching": {"max_batch_size": 8}})

    async def body(registry: Registry) -> None:
        assert registry.get("noun").batching.max_in_flight == 2
        assert await _concurrent_predicts(registry, "noun") == 2

    with_registry(settings(repo, max_wait_ms=0.0, max_in_flight=2, stage_full_batches=False), body)


def test_models_yaml_rejects_zero_in_flight(repo: Path) -> None:
    only(repo, noun={"base_path": "noun-topic", "batching": {"max_in_flight": 0}})
    with pytest.raises(ConfigError, match="max_in_flight"):
        load_repository_config(repo)


def test_batches_tokenized_one_by_one_or_together_give_the_sessions_answers(repo: Path) -> None:
    """Below and at/above ``BATCH_MIN_TEXTS`` (a batch tokenized in numpy), with a non-ASCII
    text among them, and beyond one batch: rows equal the session's own answers for the same
    texts classified alone, in order."""
    texts = mixed_texts()

    async def body(registry: Registry) -> None:
        plane = DataPlane(registry, registry.settings)
        mv = registry.get("noun")
        assert mv.runtime is not None
        for n in (1, BATCH_MIN_TEXTS - 1, BATCH_MIN_TEXTS, len(texts)):
            got = await plane.probabilities(mv, texts[:n])
            want = np.concatenate(
                [mv.runtime.predict(mv.runtime.tokenizer.encode_batch([t])) for t in texts[:n]]
            )
            np.testing.assert_allclose(got, want, atol=1e-5)

    only(repo, noun={"base_path": "noun-topic", "batching": {"max_batch_size": 8}})
    with_registry(settings(repo), body)
