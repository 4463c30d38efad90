"""TensorFlow Serving REST compatible routes over a real uvicorn server."""

from __future__ import annotations

import base64

import httpx
import numpy as np
import numpy.typing as npt
import pytest

from tests.server.conftest import BROKEN, LiveServer

TEXTS = ["to run quickly", "a small brown bird", "", "slowly"]


def session_probs(
    live: LiveServer, model: str, texts: list[str], version: int | None = None
) -> npt.NDArray[np.float32]:
    mv = live.registry.get(model, version)
    assert mv.runtime is not None
    return mv.runtime.predict(mv.runtime.tokenizer.encode_batch(texts))


def test_predict_row_format(client: httpx.Client, live_server: LiveServer) -> None:
    r = client.post("/v1/models/verb-topic:predict", json={"instances": TEXTS})
    assert r.status_code == 200
    body = r.json()
    assert list(body) == ["predictions"]
    predictions = np.array(body["predictions"], dtype=np.float32)
    assert predictions.shape == (len(TEXTS), 15)
    np.testing.assert_allclose(predictions.sum(axis=1), 1.0, atol=1e-4)
    np.testing.assert_allclose(
        predictions, session_probs(live_server, "verb-topic", TEXTS), atol=1e-5
    )


def test_predict_columnar_format_answers_outputs(
    client: httpx.Client, live_server: LiveServer
) -> None:
    want = session_probs(live_server, "pos", TEXTS)
    for inputs in (TEXTS, {"text": TEXTS}):
        r = client.post(
            "/v1/models/pos:predict", json={"inputs": inputs, "signature_name": "serving_default"}
        )
        assert r.status_code == 200
        np.testing.assert_allclose(np.array(r.json()["outputs"]), want, atol=1e-5)


def test_predict_b64_and_named_instances(client: httpx.Client, live_server: LiveServer) -> None:
    instances = [
        {"b64": base64.b64encode(TEXTS[0].encode()).decode()},
        {"text": TEXTS[1]},
        {"text": {"b64": base64.b64encode("café au lait".encode()).decode()}},
    ]
    r = client.post("/v1/models/pos:predict", json={"instances": instances})
    assert r.status_code == 200
    want = session_probs(live_server, "pos", [TEXTS[0], TEXTS[1], "café au lait"])
    np.testing.assert_allclose(np.array(r.json()["predictions"]), want, atol=1e-5)


def test_predict_version_and_form_content_type(
    client: httpx.Client, live_server: LiveServer
) -> None:
    # curl -d '{"instances": [...]}' URL sends application/x-www-form-urlencoded
    r = client.post(
        "/v1/models/pos/versions/1:predict",
        content=b'{"instances": ["quickly"]}',
        headers={"content-type": "application/x-www-form-urlencoded"},
    )
    assert r.status_code == 200
    np.testing.assert_allclose(
        np.array(r.json()["predictions"]),
        session_probs(live_server, "pos", ["quickly"], 1),
        atol=1e-5,
    )


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ({}, "instances"),
        ({"instances": ["a"], "inputs": ["b"]}, "not both"),
        ({"instances": "a"}, "list of strings"),
        ({"instances": []}, "must not be empty"),
        ({"instances": [{"b64": "%%%"}]}, "base64"),
        ({"instances": [{"txt": "a"}]}, "'text'"),
        ({"inputs": {"a": ["x"], "b": ["y"]}}, "exactly one input"),
        ({"instances": ["a"], "signature_name": 0}, "'signature_name' must be a string"),
    ],
)
def test_predict_bad_requests(client: httpx.Client, body: object, fragment: str) -> None:
    r = client.post("/v1/models/pos:predict", json=body)
    assert r.status_code == 400
    assert fragment in r.json()["error"]


def test_version_status_and_metadata(client: httpx.Client) -> None:
    r = client.get("/v1/models/pos/versions/1")
    assert r.status_code == 200
    assert r.json() == {
        "model_version_status": [
            {
                "version": "1",
                "state": "AVAILABLE",
                "status": {"error_code": "OK", "error_message": ""},
            }
        ]
    }
    assert client.get("/v1/models/pos/versions/9").status_code == 404
    assert (
        client.get(f"/v1/models/{BROKEN}/versions/1").json()["model_version_status"][0]["state"]
        == "END"
    )

    for path, version in (
        ("/v1/models/pos/metadata", "2"),
        ("/v1/models/pos/versions/1/metadata", "1"),
    ):
        r = client.get(path)
        assert r.status_code == 200
        meta = r.json()
        assert meta["model_spec"] == {"name": "pos", "signature_name": "", "version": version}
        sig = meta["metadata"]["signature_def"]["signature_def"]["serving_default"]
        assert sig["inputs"]["text"]["dtype"] == "DT_STRING"
        assert sig["outputs"]["probs"]["dtype"] == "DT_FLOAT"
        dims = [d["size"] for d in sig["outputs"]["probs"]["tensor_shape"]["dim"]]
        assert dims == ["-1", "4"]
    assert client.get(f"/v1/models/{BROKEN}/metadata").status_code == 503
