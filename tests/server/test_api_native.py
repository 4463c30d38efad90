"""Native routes over a real uvicorn server: classify (one model, a version, all models) and the
model list. Expected answers come from the model version's own session (``runtime.predict``).
"""

from __future__ import annotations

import httpx
import numpy as np
import numpy.typing as npt
import pytest

from tests.server.conftest import BROKEN, SMALL_BATCH, LiveServer

TEXTS = [
    "a large carnivorous feline of Africa and Asia with a tawny coat",
    "to move fast by using one's feet",
    "",
    "the act of buying and selling goods",
    "   ",
    "quickly",
]


def expected(
    live: LiveServer, model: str, texts: list[str], version: int | None = None
) -> npt.NDArray[np.float32]:
    mv = live.registry.get(model, version)
    assert mv.runtime is not None
    return mv.runtime.predict(mv.runtime.tokenizer.encode_batch(texts))


def test_classify_matches_the_session_in_order(
    client: httpx.Client, live_server: LiveServer
) -> None:
    r = client.post("/v1/models/noun-topic:classify", json={"texts": TEXTS})
    assert r.status_code == 200
    assert r.headers["content-type"] == "application/json"
    body = r.json()
    assert body["model"] == "noun-topic"
    assert body["version"] == "2"
    probs = expected(live_server, "noun-topic", TEXTS)
    labels = live_server.registry.get("noun-topic").labels
    assert len(body["results"]) == len(TEXTS)
    for row, result in zip(probs, body["results"], strict=True):
        best = int(np.argmax(row))
        assert result["label"] == labels[best]
        assert result["score"] == pytest.approx(float(row[best]), abs=1e-5)
        assert result["top_k"] == [{"label": result["label"], "score": result["score"]}]


def test_each_text_answers_as_if_alone(client: httpx.Client) -> None:
    together = client.post("/v1/models/pos:classify", json={"texts": TEXTS, "top_k": 4}).json()
    for text, result in zip(TEXTS, together["results"], strict=True):
        alone = client.post("/v1/models/pos:classify", json={"texts": [text], "top_k": 4}).json()
        (single,) = alone["results"]
        assert single["label"] == result["label"]
        for a, b in zip(single["top_k"], result["top_k"], strict=True):
            assert a["label"] == b["label"]
            assert a["score"] == pytest.approx(b["score"], abs=1e-5)


def test_top_k_ranks_labels(client: httpx.Client, live_server: LiveServer) -> None:
    r = client.post("/v1/models/verb-topic:classify", json={"texts": TEXTS[:2], "top_k": 5})
    assert r.status_code == 200
    probs = expected(live_server, "verb-topic", TEXTS[:2])
    labels = live_server.registry.get("verb-topic").labels
    for row, result in zip(probs, r.json()["results"], strict=True):
        ranked = result["top_k"]
        assert len(ranked) == 5
        scores = [x["score"] for x in ranked]
        assert scores == sorted(scores, reverse=True)
        assert ranked[0]["label"] == result["label"]
        want = [labels[i] for i in np.argsort(-row, kind="stable")[:5]]
        assert [x["label"] for x in ranked] == want
    # top_k beyond the number of labels is capped at it (pos has 4 labels).
    r = client.post("/v1/models/pos:classify", json={"texts": ["x"], "top_k": 50})
    (result,) = r.json()["results"]
    assert len(result["top_k"]) == 4
    assert sum(x["score"] for x in result["top_k"]) == pytest.approx(1.0, abs=1e-4)


def test_an_animal_gloss_gets_the_animal_topic(client: httpx.Client) -> None:
    glosses = [
        "a large carnivorous feline of Africa and Asia with a tawny coat",
        "a domesticated carnivorous mammal that typically has a long snout and barks",
        "a small rodent with a long tail that lives in fields and houses",
    ]
    r = client.post("/v1/models/noun-topic:classify", json={"texts": glosses, "top_k": 5})
    assert r.status_code == 200
    for result in r.json()["results"]:
        assert "noun.animal" in [x["label"] for x in result["top_k"]]


def test_explicit_versions(client: httpx.Client, live_server: LiveServer) -> None:
    answers = {}
    for v in ("1", "2"):
        r = client.post(f"/v1/models/pos/versions/{v}:classify", json={"texts": TEXTS, "top_k": 4})
        assert r.status_code == 200
        assert r.json()["version"] == v
        answers[v] = r.json()["results"]
    # Version 1 (stripped checkpoint) and 2 (frozen graph) hold the same weights.
    for a, b in zip(answers["1"], answers["2"], strict=True):
        assert [x["label"] for x in a["top_k"]] == [x["label"] for x in b["top_k"]]
        assert [x["score"] for x in a["top_k"]] == pytest.approx(
            [x["score"] for x in b["top_k"]], abs=1e-5
        )
    probs = expected(live_server, "pos", TEXTS, version=1)
    assert [r["score"] for r in answers["1"]] == pytest.approx(probs.max(axis=1).tolist(), abs=1e-5)


def test_classify_with_every_ready_model(client: httpx.Client, live_server: LiveServer) -> None:
    r = client.post("/v1/classify", json={"texts": TEXTS[:3], "top_k": 2})
    assert r.status_code == 200
    body = r.json()
    assert body["models"] == ["noun-topic", "verb-topic", "pos", SMALL_BATCH]
    assert BROKEN not in body["results"]
    for name in body["models"]:
        answer = body["results"][name]
        assert answer["version"] == "2"
        probs = expected(live_server, name, TEXTS[:3])
        labels = live_server.registry.get(name).labels
        assert [x["label"] for x in answer["results"]] == [labels[i] for i in probs.argmax(axis=1)]
        assert all(len(x["top_k"]) == 2 for x in answer["results"])


def test_classify_with_named_models(client: httpx.Client) -> None:
    r = client.post(
        "/v1/classify", json={"texts": ["to run"], "models": ["pos", "verb-topic", "pos"]}
    )
    assert r.status_code == 200
    assert r.json()["models"] == ["pos", "verb-topic"]
    single = client.post("/v1/models/pos:classify", json={"texts": ["to run"]}).json()
    assert r.json()["results"]["pos"]["results"] == single["results"]
    assert (
        client.post("/v1/classify", json={"texts": ["x"], "models": ["pos", "nope"]}).status_code
        == 404
    )
    r = client.post("/v1/classify", json={"texts": ["x"], "models": ["pos", BROKEN]})
    assert r.status_code == 503
    assert BROKEN in r.json()["error"]


def test_model_list(client: httpx.Client, live_server: LiveServer) -> None:
    r = client.get("/v1/models")
    assert r.status_code == 200
    models = {m["name"]: m for m in r.json()["models"]}
    assert list(models) == ["noun-topic", "verb-topic", "pos", BROKEN, SMALL_BATCH]
    noun = models["noun-topic"]
    assert noun["state"] == "READY"
    assert noun["reason"] == ""
    assert noun["default_version"] == "2"
    assert noun["format"] == "frozen"
    assert noun["embedding"] == "glove-6b-50d-subset"
    assert "noun.animal" in noun["labels"]
    assert [v["version"] for v in noun["versions"]] == ["1", "2"]
    assert [v["format"] for v in noun["versions"]] == ["stripped", "frozen"]
    for v in noun["versions"]:
        assert v["state"] == "READY"
        assert v["load_seconds"] > 0
        assert v["warmup_seconds"] > 0
        assert v["memory"]["rss_after"] > 0
        assert v["batching"] == {
            "max_batch_size": 64,
            "max_wait_ms": 0.0,
            "max_queue": 4096,
            "max_in_flight": 1,
        }
    assert models[SMALL_BATCH]["versions"][0]["batching"]["max_batch_size"] == 8
    assert models[SMALL_BATCH]["versions"][0]["batching"]["max_wait_ms"] == 1.0
    broken = models[BROKEN]
    assert broken["state"] == "FAILED"
    assert "model.pb" in broken["reason"]
    assert broken["default_version"] is None
    (version,) = broken["versions"]
    assert version["state"] == "FAILED"
    assert "model.pb" in version["reason"]
    assert version["load_seconds"] is None


def test_model_status_is_a_tf_serving_superset(client: httpx.Client) -> None:
    r = client.get("/v1/models/pos")
    assert r.status_code == 200
    body = r.json()
    assert body["model_version_status"] == [
        {"version": "2", "state": "AVAILABLE", "status": {"error_code": "OK", "error_message": ""}},
        {"version": "1", "state": "AVAILABLE", "status": {"error_code": "OK", "error_message": ""}},
    ]
    assert body["name"] == "pos"
    assert body["labels"] == ["adj", "adv", "noun", "verb"]
    broken = client.get(f"/v1/models/{BROKEN}").json()
    (status,) = broken["model_version_status"]
    assert status["state"] == "END"
    assert status["status"]["error_code"] == "UNKNOWN"
    assert "model.pb" in status["status"]["error_message"]
    r = client.get("/v1/models/nope")
    assert r.status_code == 404
    assert r.json() == {"error": "model 'nope' not found"}
