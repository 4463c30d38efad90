"""Open Inference Protocol (KServe V2 / Triton) routes over a real uvicorn server, including a
round trip with the real ``tritonclient.http`` client (binary tensor data, classification)."""

from __future__ import annotations

import struct
from collections.abc import Iterator

import httpx
import numpy as np
import numpy.typing as npt
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from server import __version__
from tests.server.conftest import BROKEN, LiveServer

TEXTS = ["to run quickly", "a small brown bird", "", "the colour of the sky"]


def session_probs(
    live: LiveServer, model: str, texts: list[str], version: int | None = None
) -> npt.NDArray[np.float32]:
    mv = live.registry.get(model, version)
    assert mv.runtime is not None
    return mv.runtime.predict(mv.runtime.tokenizer.encode_batch(texts))


def text_input(texts: list[str], shape: list[int] | None = None) -> dict[str, object]:
    return {"name": "text", "datatype": "BYTES", "shape": shape or [len(texts)], "data": texts}


@pytest.fixture
def triton_client(live_server: LiveServer) -> Iterator[triton.InferenceServerClient]:
    c = triton.InferenceServerClient(url=live_server.url.removeprefix("http://"))
    yield c
    c.close()


def test_health_and_server_metadata(client: httpx.Client) -> None:
    assert client.get("/v2/health/live").json() == {"live": True}
    r = client.get("/v2/health/ready")
    assert r.status_code == 200
    assert r.json() == {"ready": True}
    meta = client.get("/v2").json()
    assert meta["name"] == "textserve"
    assert meta["version"] == __version__
    assert set(meta["extensions"]) >= {"classification", "binary_tensor_data"}


def test_model_metadata_and_readiness(client: httpx.Client) -> None:
    for path in ("/v2/models/noun-topic", "/v2/models/noun-topic/versions/1"):
        meta = client.get(path).json()
        assert meta["name"] == "noun-topic"
        assert meta["versions"] == ["1", "2"]
        assert meta["inputs"] == [{"name": "text", "datatype": "BYTES", "shape": [-1]}]
        assert meta["outputs"] == [{"name": "probs", "datatype": "FP32", "shape": [-1, 26]}]
    assert client.get("/v2/models/pos/ready").json() == {"name": "pos", "ready": True}
    assert client.get("/v2/models/pos/versions/1/ready").status_code == 200
    r = client.get(f"/v2/models/{BROKEN}/ready")
    assert r.status_code == 400
    assert r.json()["ready"] is False
    assert "model.pb" in r.json()["error"]
    assert client.get("/v2/models/nope/ready").status_code == 404
    assert client.get("/v2/models/pos/versions/7/ready").status_code == 404
    assert client.get("/v2/models/nope").status_code == 404


def test_infer_json(client: httpx.Client, live_server: LiveServer) -> None:
    r = client.post("/v2/models/pos/infer", json={"id": "req-1", "inputs": [text_input(TEXTS)]})
    assert r.status_code == 200
    body = r.json()
    assert body["model_name"] == "pos"
    assert body["model_version"] == "2"
    assert body["id"] == "req-1"
    (out,) = body["outputs"]
    assert out["name"] == "probs"
    assert out["datatype"] == "FP32"
    assert out["shape"] == [4, 4]
    got = np.array(out["data"], dtype=np.float32).reshape(out["shape"])
    np.testing.assert_allclose(got, session_probs(live_server, "pos", TEXTS), atol=1e-5)
    # [N, 1] and nested data are accepted too; a version route answers that version.
    r = client.post(
        "/v2/models/pos/versions/1/infer",
        json={"inputs": [text_input([[t] for t in TEXTS], [4, 1])]},  # type: ignore[misc]
    )
    assert r.status_code == 200
    assert r.json()["model_version"] == "1"
    np.testing.assert_allclose(
        np.array(r.json()["outputs"][0]["data"]).reshape(4, 4),
        session_probs(live_server, "pos", TEXTS, 1),
        atol=1e-5,
    )


def test_infer_classification_extension(client: httpx.Client, live_server: LiveServer) -> None:
    r = client.post(
        "/v2/models/noun-topic/infer",
        json={
            "inputs": [text_input(TEXTS)],
            "outputs": [{"name": "probs", "parameters": {"classification": 3}}],
        },
    )
    assert r.status_code == 200
    (out,) = r.json()["outputs"]
    assert out["datatype"] == "BYTES"
    assert out["shape"] == [4, 3]
    probs = session_probs(live_server, "noun-topic", TEXTS)
    labels = live_server.registry.get("noun-topic").labels
    for i, text_row in enumerate(np.array(out["data"]).reshape(4, 3)):
        top = np.argsort(-probs[i], kind="stable")[:3]
        for cell, j in zip(text_row, top, strict=True):
            score, index, label = cell.split(":", 2)
            assert int(index) == j
            assert label == labels[j]
            assert float(score) == pytest.approx(float(probs[i, j]), abs=1e-5)


def test_infer_binary_tensor_data_by_hand(client: httpx.Client, live_server: LiveServer) -> None:
    raw = b"".join(struct.pack("<I", len(t.encode())) + t.encode() for t in TEXTS)
    header = {
        "inputs": [
            {
                "name": "text",
                "datatype": "BYTES",
                "shape": [4],
                "parameters": {"binary_data_size": len(raw)},
            }
        ],
        "outputs": [{"name": "probs", "parameters": {"binary_data": True}}],
    }
    import json

    head = json.dumps(header).encode()
    r = client.post(
        "/v2/models/pos/infer",
        content=head + raw,
        headers={
            "Inference-Header-Content-Length": str(len(head)),
            "content-type": "application/octet-stream",
        },
    )
    assert r.status_code == 200
    n = int(r.headers["Inference-Header-Content-Length"])
    meta = json.loads(r.content[:n])
    (out,) = meta["outputs"]
    assert out["parameters"]["binary_data_size"] == 4 * 4 * 4
    got = np.frombuffer(r.content[n:], dtype="<f4").reshape(out["shape"])
    np.testing.assert_allclose(got, session_probs(live_server, "pos", TEXTS), atol=1e-6)


def test_tritonclient_round_trip(
    triton_client: triton.InferenceServerClient, live_server: LiveServer
) -> None:
    assert triton_client.is_server_live()
    assert triton_client.is_server_ready()
    assert triton_client.is_model_ready("verb-topic")
    assert not triton_client.is_model_ready(BROKEN)
    meta = triton_client.get_model_metadata("verb-topic")
    assert meta["outputs"][0]["shape"] == [-1, 15]

    texts = np.array([t.encode() for t in TEXTS], dtype=np.object_)
    inp = triton.InferInput("text", [len(TEXTS)], "BYTES")
    inp.set_data_from_numpy(texts)  # binary tensor data (the client's default)
    result = triton_client.infer(
        "verb-topic", [inp], outputs=[triton.InferRequestedOutput("probs")]
    )
    probs = result.as_numpy("probs")
    assert probs.dtype == np.float32
    np.testing.assert_allclose(probs, session_probs(live_server, "verb-topic", TEXTS), atol=1e-6)

    # JSON input data, classification output, explicit version.
    inp = triton.InferInput("text", [len(TEXTS)], "BYTES")
    inp.set_data_from_numpy(texts, binary_data=False)
    result = triton_client.infer(
        "verb-topic",
        [inp],
        model_version="1",
        outputs=[triton.InferRequestedOutput("probs", class_count=2)],
    )
    top = result.as_numpy("probs")
    assert top.shape == (len(TEXTS), 2)
    labels = live_server.registry.get("verb-topic").labels
    best = session_probs(live_server, "verb-topic", TEXTS, 1).argmax(axis=1)
    for row, j in zip(top, best, strict=True):
        cell = row[0].decode() if isinstance(row[0], bytes) else str(row[0])
        assert cell.split(":", 2)[1:] == [str(j), labels[j]]

    with pytest.raises(InferenceServerException, match="not found"):
        triton_client.infer("nope", [inp])


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ({"inputs": []}, "exactly one tensor"),
        (
            {"inputs": [{"name": "x", "datatype": "BYTES", "shape": [1], "data": ["a"]}]},
            "unknown input",
        ),
        ({"inputs": [{"name": "text", "datatype": "FP32", "shape": [1], "data": [1.0]}]}, "BYTES"),
        ({"inputs": [{"name": "text", "datatype": "BYTES", "shape": [2], "data": ["a"]}]}, "shape"),
        (
            {
                "inputs": [
                    {"name": "text", "datatype": "BYTES", "shape": [1, 2], "data": ["a", "b"]}
                ]
            },
            "shape",
        ),
        ({"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1]}]}, "data"),
        (
            {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": [1]}]},
            "must be a string",
        ),
        ({"inputs": [text_input(["a"])], "outputs": [{"name": "logits"}]}, "unknown output"),
        (
            {
                "inputs": [text_input(["a"])],
                "outputs": [{"name": "probs", "parameters": {"classification": 0}}],
            },
            "classification",
        ),
        ({"inputs": [text_input(["a"])], "id": 5}, "'id'"),
    ],
)
def test_infer_bad_requests(client: httpx.Client, body: object, fragment: str) -> None:
    r = client.post("/v2/models/pos/infer", json=body)
    assert r.status_code == 400
    assert fragment in r.json()["error"]


def test_infer_bad_binary_framing(client: httpx.Client) -> None:
    head = (
        b'{"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], '
        b'"parameters": {"binary_data_size": 10}}]}'
    )
    cases = [
        (
            {"Inference-Header-Content-Length": "abc"},
            head + b"x" * 10,
            "Inference-Header-Content-Length",
        ),
        ({"Inference-Header-Content-Length": str(len(head) + 99)}, head, "does not fit"),
        (
            {"Inference-Header-Content-Length": str(len(head))},
            head + b"\x05\x00",
            "binary_data_size",
        ),
        (
            {"Inference-Header-Content-Length": str(len(head))},
            head + b"\xff\x00\x00\x00" + b"x" * 6,
            "BYTES element",
        ),
        (
            {"Inference-Header-Content-Length": str(len(head))},
            head + struct.pack("<I", 6) + b"\xff\xfeabcd",
            "UTF-8",
        ),
    ]
    for headers, content, fragment in cases:
        r = client.post("/v2/models/pos/infer", content=content, headers=headers)
        assert r.status_code == 400, (headers, r.text)
        assert fragment in r.json()["error"]
