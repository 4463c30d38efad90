"""GET /v1/memory of the real server: every loaded version, exact totals, one shared embedding
counted once, process figures; unload unregisters; the sampler lives with the app."""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pytest

from server.registry import ModelVersion, Registry, VersionState
from server.settings import Settings
from tests.server.conftest import LiveServer, copy_repo, edit_models_yaml, run_server
from tests.server.test_metrics_live import scrape, series, value


def ready_versions(registry: Registry) -> list[ModelVersion]:
    return [
        mv
        for e in registry.entries()
        for mv in registry.versions(e.name)
        if mv.state is VersionState.READY
    ]


def check_report(report: dict[str, Any], registry: Registry) -> None:
    """The report against the registry's own runtimes and embedding store."""
    loaded = ready_versions(registry)
    models = {(m["model"], m["version"]): m for m in report["models"]}
    assert set(models) == {(mv.name, mv.version) for mv in loaded}
    store = registry.store
    assert store is not None
    users = Counter(mv.runtime.embedding_key for mv in loaded if mv.runtime is not None)
    for mv in loaded:
        assert mv.runtime is not None
        m = models[(mv.name, mv.version)]
        assert m["own_bytes"] == mv.runtime.own_bytes > 0
        key = mv.runtime.embedding_key
        if key is None:
            assert m["embedding"] is None
            assert m["attributed_bytes"] == m["own_bytes"]
        else:
            shared = store.get(key)
            assert shared is not None
            e = m["embedding"]
            assert e["key"] == key
            assert e["bytes"] == shared.nbytes
            assert e["sharers"] == users[key]
            assert m["attributed_bytes"] == m["own_bytes"] + e["share_bytes"]
        assert m["load"]["seconds"] > 0
    # each distinct embedding once, its shares adding up to its bytes exactly
    embeddings = {e["key"]: e for e in report["embeddings"]}
    assert set(embeddings) == {k for k in users if k is not None}
    for key, e in embeddings.items():
        assert len(e["models"]) == users[key]
        shares = [
            m["embedding"]["share_bytes"]
            for m in report["models"]
            if m["embedding"] and m["embedding"]["key"] == key
        ]
        assert sum(shares) == e["bytes"]
        assert max(shares) - min(shares) <= 1
    totals = report["totals"]
    own = sum(m["own_bytes"] for m in report["models"])
    distinct = sum(e["bytes"] for e in report["embeddings"])
    assert totals["models"] == len(loaded)
    assert totals["own_bytes"] == own
    assert totals["embedding_bytes"] == distinct
    assert totals["attributed_bytes"] == sum(m["attributed_bytes"] for m in report["models"])
    assert totals["attributed_bytes"] == totals["tensor_bytes"] == own + distinct


def test_memory_report_of_the_live_server(client: httpx.Client, live_server: LiveServer) -> None:
    r = client.get("/v1/memory")
    assert r.status_code == 200
    assert r.headers["content-type"] == "application/json"
    report = r.json()
    check_report(report, live_server.registry)
    # the fixture repository: one GloVe subset shared by several versions, counted once
    (embedding,) = report["embeddings"]
    assert len(embedding["models"]) >= 2
    assert report["totals"]["embedding_bytes"] == embedding["bytes"]
    process = report["process"]
    for kind in ("rss", "uss", "pss"):
        assert process[f"{kind}_bytes"] > 0
    assert process["uss_bytes"] <= process["pss_bytes"] <= process["rss_bytes"]
    assert process["peak_rss_bytes"] >= process["rss_bytes"]
    assert process["samples"] >= 1
    assert process["interval_seconds"] == live_server.settings.memory_sample_interval_s
    # the serving process holds TensorFlow: far more than the models' tensors
    assert process["uss_bytes"] > report["totals"]["tensor_bytes"]


def test_unload_unregisters_and_the_sampler_follows_the_lifespan(
    small_repo: Path, tmp_path: Path
) -> None:
    repo = copy_repo(small_repo, tmp_path / "repo")
    edit_models_yaml(repo, {"noun-topic": None})  # pos and verb-topic, two versions each
    settings = Settings(_env_file=None, repo=repo, warmup=False, memory_sample_interval_s=0.05)
    with run_server(settings) as live, httpx.Client(base_url=live.url, timeout=30) as client:
        monitor = live.registry.memory
        assert monitor.running
        first = monitor.samples
        deadline = time.monotonic() + 10
        while monitor.samples < first + 3:
            assert time.monotonic() < deadline, "the sampler took no sample in 10 s"
            time.sleep(0.05)
        before = client.get("/v1/memory").json()
        check_report(before, live.registry)
        assert {m["model"] for m in before["models"]} == {"pos", "verb-topic"}
        (embedding,) = before["embeddings"]
        assert len(embedding["models"]) == 4

        live.registry.unload("pos").result(timeout=60)
        after = client.get("/v1/memory").json()
        check_report(after, live.registry)
        assert {m["model"] for m in after["models"]} == {"verb-topic"}
        assert all(m["embedding"]["sharers"] == 2 for m in after["models"])
        assert after["totals"]["embedding_bytes"] == before["totals"]["embedding_bytes"]
        samples = scrape(client)
        memory_series = series(samples, "textserve_model_memory_bytes")
        assert {s["model"] for s in memory_series} == {"verb-topic"}
        share = value(
            samples,
            "textserve_model_memory_bytes",
            model="verb-topic",
            version="1",
            kind="embedding_share",
        )
        assert share == pytest.approx(embedding["bytes"] / 2, abs=1)

        live.registry.load("pos").result(timeout=60)
        check_report(client.get("/v1/memory").json(), live.registry)
    assert not monitor.running
