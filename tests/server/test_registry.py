"""The model registry on a real small repository: real TensorFlow sessions, real batchers."""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import numpy as np
import pytest

from server.artifact import MODEL_JSON
from server.errors import ModelNotFound, ModelNotReady, VersionNotFound
from server.registry import ModelState, Registry, VersionState, warm_up
from server.runtime.base import ProbArray, Runtime
from server.settings import Settings
from server.text import IdArray
from tests.server.conftest import add_broken_model, copy_repo, edit_models_yaml

T = TypeVar("T")

TEXTS = ["a small dog that barks", "to run quickly", "", "very slowly and carefully indeed"]


@pytest.fixture
def repo(small_repo: Path, tmp_path: Path) -> Path:
    return copy_repo(small_repo, tmp_path / "repo")


def only(repo: Path, **models: dict[str, object]) -> None:
    """Make models.yaml configure exactly ``models`` (name → config)."""
    current = [str(m["name"]) for m in _models(repo)]
    edit_models_yaml(repo, {name: None for name in current})
    edit_models_yaml(repo, {name: cfg for name, cfg in models.items()})


def _models(repo: Path) -> list[dict[str, object]]:
    import yaml

    data = yaml.safe_load((repo / "models.yaml").read_text(encoding="utf-8"))
    return list(data["models"])


def add_version(repo: Path, model: str, source: int, number: int) -> Path:
    """Copy ``model/source`` to ``model/number`` with its model.json saying ``number``."""
    dst = repo / model / str(number)
    shutil.copytree(repo / model / str(source), dst)
    manifest = json.loads((dst / MODEL_JSON).read_text(encoding="utf-8"))
    manifest["version"] = number
    (dst / MODEL_JSON).unlink()  # a hard link into the shared fixture
    (dst / MODEL_JSON).write_text(json.dumps(manifest), encoding="utf-8")
    return dst


def settings(repo: Path, **kw: object) -> Settings:
    return Settings(_env_file=None, repo=repo, **kw)  # type: ignore[arg-type]


def with_registry(cfg: Settings, body: Callable[[Registry], Awaitable[T]]) -> T:
    """Start a registry on a fresh event loop, wait for the first load pass, run ``body``."""

    async def main() -> T:
        registry = Registry(cfg)
        await registry.start()
        try:
            await asyncio.wait_for(registry.wait_loaded(), 120)
            return await body(registry)
        finally:
            await registry.close(5)

    return asyncio.run(main())


async def wait_for(future: object) -> None:
    import concurrent.futures

    assert isinstance(future, concurrent.futures.Future)
    await asyncio.wait_for(asyncio.wrap_future(future), 120)


def test_loads_every_version_and_serves_the_newest(repo: Path) -> None:
    async def body(registry: Registry) -> None:
        assert registry.ready
        assert registry.ready_models() == ["noun-topic", "verb-topic", "pos"]
        for name in ("noun-topic", "verb-topic", "pos"):
            versions = registry.versions(name)
            assert [(v.version, v.state) for v in versions] == [
                (1, VersionState.READY),
                (2, VersionState.READY),
            ]
            assert registry.get(name).version == 2
            assert registry.get(name, 1).version == 1
            for mv in versions:
                assert mv.stats is not None
                assert mv.stats.load_seconds > 0
                assert mv.stats.warmup_seconds > 0
                assert mv.stats.memory_before.rss > 0
                assert mv.stats.memory_after.uss > 0
                assert mv.embedding == "glove-6b-50d-subset"
                assert mv.batching.max_batch_size == 64
        # Version 1 (stripped checkpoint) and 2 (frozen graph) hold the same weights.
        v1, v2 = registry.get("pos", 1), registry.get("pos", 2)
        assert v1.runtime is not None
        assert v2.runtime is not None
        ids = v1.runtime.tokenizer.encode_batch(TEXTS)
        np.testing.assert_allclose(v1.runtime.predict(ids), v2.runtime.predict(ids), atol=1e-5)
        # Through the batcher: the same answers as the session itself, rows in order.
        assert v2.batcher is not None
        via_batcher = await v2.batcher.submit(TEXTS)
        np.testing.assert_allclose(via_batcher, v2.runtime.predict(ids), atol=1e-6)
        # One embedding copy for the whole process.
        assert registry.store is not None
        assert len(registry.store) == 1

    with_registry(settings(repo), body)


def test_lookup_errors(repo: Path) -> None:
    only(repo, pos={"base_path": "pos", "version_policy": {"specific": [1]}})

    async def body(registry: Registry) -> None:
        assert [v.version for v in registry.versions("pos")] == [1]
        with pytest.raises(ModelNotFound):
            registry.get("nope")
        with pytest.raises(VersionNotFound):
            registry.get("pos", 2)
        with pytest.raises(ModelNotFound):
            registry.versions("nope")

    with_registry(settings(repo), body)


def test_readiness_waits_for_the_first_load_pass(repo: Path) -> None:
    only(repo, pos={"base_path": "pos"})

    async def main() -> None:
        registry = Registry(settings(repo))
        await registry.start()
        try:
            assert registry.live
            assert not registry.ready  # the loader thread has only just been given the work
            assert registry.entry("pos").state is ModelState.LOADING
            with pytest.raises(ModelNotReady):
                registry.get("pos")
            await asyncio.wait_for(registry.wait_loaded(), 120)
            assert registry.ready
        finally:
            await registry.close(5)
        assert not registry.ready
        assert not registry.live

    asyncio.run(main())


def test_a_broken_model_fails_alone(repo: Path) -> None:
    add_broken_model(repo)

    async def body(registry: Registry) -> None:
        entry = registry.entry("broken")
        assert entry.state is ModelState.FAILED
        (mv,) = registry.versions("broken")
        assert mv.state is VersionState.FAILED
        assert "model.pb" in mv.reason
        assert "\n" not in mv.reason
        with pytest.raises(ModelNotReady, match="FAILED"):
            registry.get("broken")
        with pytest.raises(ModelNotReady, match="FAILED"):
            registry.get("broken", 1)
        # The others serve, and the server is ready (a FAILED model does not hold it back).
        assert registry.ready
        assert registry.ready_models() == ["noun-topic", "verb-topic", "pos"]

    with_registry(settings(repo), body)


def test_every_model_failing_is_not_ready(repo: Path) -> None:
    add_broken_model(repo)
    only(repo, broken={"base_path": "broken"})

    async def body(registry: Registry) -> None:
        assert registry.loaded
        assert not registry.ready

    with_registry(settings(repo), body)


@pytest.mark.parametrize(
    ("config", "reason"),
    [
        ({"base_path": "../outside"}, "escapes the repository root"),
        ({"base_path": "does-not-exist"}, "no numbered version directories"),
        ({"base_path": "pos", "version_policy": {"specific": [7]}}, "version policy"),
        ({"base_path": "pos", "embedding": "nope"}, "declares no embedding"),
        ({"base_path": "pos", "format": "stripped", "version_policy": {"specific": [2]}}, "format"),
    ],
)
def test_configuration_problems_are_reasons(
    repo: Path, config: dict[str, object], reason: str
) -> None:
    only(repo, bad=config, pos={"base_path": "pos"})

    async def body(registry: Registry) -> None:
        entry = registry.entry("bad")
        assert entry.state is ModelState.FAILED
        assert reason in entry.state_reason
        assert registry.get("pos").version == 2

    with_registry(settings(repo), body)


def test_mislabelled_model_fails_at_load_or_warm_up(repo: Path) -> None:
    dst = add_version(repo, "pos", 2, 3)
    manifest = json.loads((dst / MODEL_JSON).read_text(encoding="utf-8"))
    manifest["labels"] = manifest["labels"][:3]  # the graph still answers 4 classes
    (dst / MODEL_JSON).write_text(json.dumps(manifest), encoding="utf-8")
    only(repo, pos={"base_path": "pos", "version_policy": {"specific": [3]}})

    async def body(registry: Registry) -> None:
        (mv,) = registry.versions("pos")
        assert mv.state is VersionState.FAILED
        assert "3" in mv.reason
        assert "4" in mv.reason

    with_registry(settings(repo), body)


def test_embedding_override_from_models_yaml(repo: Path) -> None:
    import yaml

    path = repo / "models.yaml"
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    original = data["embeddings"][0]
    data["embeddings"].append({"name": "same-glove", "path": original["path"]})
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    only(repo, pos={"base_path": "pos", "embedding": "same-glove"})

    async def body(registry: Registry) -> None:
        assert registry.get("pos").embedding == "same-glove"

    with_registry(settings(repo), body)


def test_batching_settings_from_models_yaml_override_defaults(repo: Path) -> None:
    only(
        repo,
        pos={"base_path": "pos", "batching": {"max_batch_size": 8, "max_queue": 100}},
        noun={"base_path": "noun-topic"},
    )

    async def body(registry: Registry) -> None:
        pos, noun = registry.get("pos"), registry.get("noun")
        assert (pos.batching.max_batch_size, pos.batching.max_wait_ms) == (8, 3.5)
        assert pos.batching.max_queue == 100
        assert (noun.batching.max_batch_size, noun.batching.max_queue) == (16, 4096)

    with_registry(settings(repo, max_batch_size=16, max_wait_ms=3.5), body)


def test_poll_replaces_a_version_only_once_the_new_one_is_ready(repo: Path) -> None:
    only(repo, pos={"base_path": "pos"})  # version_policy latest

    async def body(registry: Registry) -> None:
        assert [v.version for v in registry.versions("pos")] == [2]
        old = registry.get("pos")
        assert old.runtime is not None
        ids = old.runtime.tokenizer.encode_batch(TEXTS)
        expected = old.runtime.predict(ids)

        add_version(repo, "pos", 2, 3)
        await wait_for(registry.poll())
        assert [v.version for v in registry.versions("pos")] == [3]
        new = registry.get("pos")
        assert new.version == 3
        assert new.runtime is not None
        np.testing.assert_allclose(new.runtime.predict(ids), expected, atol=1e-6)
        assert old.state is VersionState.UNLOADING
        assert old.runtime is None  # its session was closed

        # A broken version 4: FAILED, and version 3 keeps serving.
        broken = add_version(repo, "pos", 2, 4)
        (broken / "model.pb").unlink()
        (broken / "model.pb").write_bytes(b"garbage")
        await wait_for(registry.poll())
        states = {v.version: v.state for v in registry.versions("pos")}
        assert states == {3: VersionState.READY, 4: VersionState.FAILED}
        assert registry.get("pos").version == 3
        assert registry.entry("pos").state is ModelState.READY
        # Polling again does not retry the FAILED version; load() does.
        await wait_for(registry.poll())
        assert registry.versions("pos")[-1].state is VersionState.FAILED
        (broken / "model.pb").unlink()
        shutil.copy2(repo / "pos" / "2" / "model.pb", broken / "model.pb")
        await wait_for(registry.load("pos"))
        assert [v.version for v in registry.versions("pos")] == [4]
        assert registry.get("pos").version == 4

    with_registry(settings(repo), body)


def test_unload_then_load(repo: Path) -> None:
    only(repo, pos={"base_path": "pos"}, verbs={"base_path": "verb-topic"})

    async def body(registry: Registry) -> None:
        await wait_for(registry.unload("pos"))
        assert registry.entry("pos").state is ModelState.UNAVAILABLE
        assert registry.versions("pos") == []
        with pytest.raises(ModelNotReady):
            registry.get("pos")
        assert registry.ready_models() == ["verbs"]
        assert registry.ready  # an unloaded model does not hold readiness back
        await wait_for(registry.load("pos"))
        assert registry.get("pos").version == 2
        with pytest.raises(ModelNotFound):
            registry.unload("nope")
        with pytest.raises(ModelNotFound):
            await wait_for(registry.load("nope"))

    with_registry(settings(repo), body)


def test_poll_follows_models_yaml(repo: Path) -> None:
    only(repo, pos={"base_path": "pos"})

    async def body(registry: Registry) -> None:
        only(repo, verbs={"base_path": "verb-topic"})
        await wait_for(registry.poll())
        assert registry.ready_models() == ["verbs"]
        with pytest.raises(ModelNotFound):
            registry.get("pos")

    with_registry(settings(repo), body)


def test_close_drains_queued_work(repo: Path) -> None:
    only(repo, pos={"base_path": "pos", "batching": {"max_batch_size": 2}})

    async def main() -> None:
        registry = Registry(settings(repo, max_wait_ms=0))
        await registry.start()
        await asyncio.wait_for(registry.wait_loaded(), 120)
        mv = registry.get("pos")
        assert mv.batcher is not None
        pending = [asyncio.ensure_future(mv.batcher.submit(TEXTS)) for _ in range(5)]
        await asyncio.sleep(0)  # let them queue
        await registry.close(30)
        results = await asyncio.gather(*pending)
        assert all(r.shape == (len(TEXTS), 4) for r in results)
        assert mv.runtime is None
        with pytest.raises(ModelNotFound):
            registry.get("pos")

    asyncio.run(main())


class Recording(Runtime):
    """A real runtime that also records the shape of every batch it is given."""

    def __init__(self, inner: Runtime) -> None:
        self.inner = inner
        self.manifest = inner.manifest
        self.tokenizer = inner.tokenizer
        self.shapes: list[tuple[int, ...]] = []

    def predict(self, ids: IdArray) -> ProbArray:
        self.shapes.append(ids.shape)
        return self.inner.predict(ids)

    @property
    def own_bytes(self) -> int:
        return self.inner.own_bytes

    @property
    def embedding_key(self) -> str | None:
        return self.inner.embedding_key

    def close(self) -> None:
        pass  # the registry owns the inner runtime


def test_warm_up_runs_bounded_shapes(repo: Path) -> None:
    only(repo, noun={"base_path": "noun-topic"})

    async def body(registry: Registry) -> None:
        runtime = registry.get("noun").runtime
        assert runtime is not None
        recording = Recording(runtime)
        assert warm_up(recording, 64) == 6
        assert sorted(recording.shapes) == [
            (1, 8),
            (1, 100),
            (32, 8),
            (32, 100),
            (64, 8),
            (64, 100),
        ]
        recording.shapes.clear()
        warm_up(recording, 1024)
        assert max(b * t for b, t in recording.shapes) <= 8192

    with_registry(settings(repo, warmup=False), body)
