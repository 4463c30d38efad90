"""Every error answer is ``{"error": "..."}`` with the documented status, and never hurts the
server: after all of them the server still classifies."""

from __future__ import annotations

import httpx
import pytest

from tests.server.conftest import BROKEN, LiveServer

CLASSIFY = "/v1/models/pos:classify"


def error(r: httpx.Response, status: int) -> str:
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json"
    body = r.json()
    assert list(body) == ["error"]
    assert isinstance(body["error"], str)
    assert body["error"]
    return str(body["error"])


def test_unknown_route_and_wrong_method(client: httpx.Client) -> None:
    assert "/nope" in error(client.get("/nope"), 404)
    assert "nope" in error(client.post("/v1/models/pos:nope", json={}), 404)
    assert "nope" in error(client.post("/v1/models/pos/versions/1:nope", json={}), 404)
    r = client.get(CLASSIFY)  # model names have no ':', so this is not GET /v1/models/{name}
    assert "GET" in error(r, 405)
    assert r.headers["allow"] == "POST"
    r = client.options("/v1/models/pos:predict")
    assert r.headers["allow"] == "POST"
    error(r, 405)
    r = client.post("/v1/models")
    assert "POST" in error(r, 405)
    assert "GET" in r.headers["allow"]
    error(client.put("/v2/models/pos/infer", json={}), 405)
    error(client.delete("/v2/health/ready"), 405)


def test_unknown_model_or_version(client: httpx.Client) -> None:
    assert "nope" in error(client.post("/v1/models/nope:classify", json={"texts": ["a"]}), 404)
    assert "version 9" in error(
        client.post("/v1/models/pos/versions/9:classify", json={"texts": ["a"]}), 404
    )
    assert "'x1'" in error(
        client.post("/v1/models/pos/versions/x1:classify", json={"texts": ["a"]}), 404
    )
    error(client.post("/v1/models/nope:predict", json={"instances": ["a"]}), 404)
    error(client.post("/v2/models/nope/infer", json={"inputs": []}), 404)
    error(client.post("/v2/models/pos/versions/-1/infer", json={}), 404)


def test_model_not_ready_is_503_with_retry_after(client: httpx.Client) -> None:
    for path, body in (
        (f"/v1/models/{BROKEN}:classify", {"texts": ["a"]}),
        (f"/v1/models/{BROKEN}/versions/1:classify", {"texts": ["a"]}),
        (f"/v1/models/{BROKEN}:predict", {"instances": ["a"]}),
    ):
        r = client.post(path, json=body)
        message = error(r, 503)
        assert "FAILED" in message
        assert "model.pb" in message
        assert r.headers["retry-after"] == "1"


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        (b"", "empty"),
        (b"{texts: [1]}", "not valid JSON"),
        (b'{"texts": ["\xff\xfe"]}', "UTF-8"),
        (b'{"texts": ["\\ud800"]}', "not valid JSON"),
        (b"[1, 2]", "JSON object"),
        (b'"texts"', "JSON object"),
        (b"{}", "missing field 'texts'"),
        (b'{"texts": "a"}', "list of strings"),
        (b'{"texts": null}', "list of strings"),
        (b'{"texts": []}', "must not be empty"),
        (b'{"texts": ["a", 1]}', "texts[1] must be a string"),
        (b'{"texts": ["a"], "top_k": 0}', "top_k"),
        (b'{"texts": ["a"], "top_k": 101}', "between 1 and 100"),
        (b'{"texts": ["a"], "top_k": "2"}', "integer"),
        (b'{"texts": ["a"], "top_k": true}', "integer"),
        (b'{"texts": ["a"], "top_k": 1.5}', "integer"),
        (b'{"texts": ["a"], "text": ["b"]}', "unknown field 'text'"),
    ],
)
def test_bad_bodies_are_400(client: httpx.Client, content: bytes, fragment: str) -> None:
    r = client.post(CLASSIFY, content=content, headers={"content-type": "application/json"})
    assert fragment in error(r, 400)


def test_bad_multi_model_bodies(client: httpx.Client) -> None:
    assert "models" in error(client.post("/v1/classify", json={"texts": ["a"], "models": []}), 400)
    assert "models[0]" in error(
        client.post("/v1/classify", json={"texts": ["a"], "models": [1]}), 400
    )
    assert "texts" in error(client.post("/v1/classify", json={"models": ["pos"]}), 400)


def test_content_type(client: httpx.Client) -> None:
    for media in ("text/plain", "application/xml", "multipart/form-data; boundary=x"):
        r = client.post(CLASSIFY, content=b'{"texts": ["a"]}', headers={"content-type": media})
        assert "Content-Type" in error(r, 415)
    r = client.post(
        CLASSIFY,
        content=b'{"texts": ["a"]}',
        headers={"content-type": "application/json", "content-encoding": "gzip"},
    )
    assert "Content-Encoding" in error(r, 415)
    # JSON with a charset, a +json type, or no declared type at all are accepted.
    for headers in (
        {"content-type": "application/json; charset=utf-8"},
        {"content-type": "application/vnd.x+json"},
        {},
    ):
        assert (
            client.post(CLASSIFY, content=b'{"texts": ["a"]}', headers=headers).status_code == 200
        )


def test_limits_are_413(client: httpx.Client, live_server: LiveServer) -> None:
    s = live_server.settings
    message = error(
        client.post(CLASSIFY, json={"texts": ["a"] * (s.max_texts_per_request + 1)}), 413
    )
    assert str(s.max_texts_per_request) in message
    message = error(
        client.post(CLASSIFY, json={"texts": ["ok", "x" * (s.max_text_chars + 1)]}), 413
    )
    assert "texts[1]" in message
    big = b'{"texts": ["' + b"a" * s.max_body_bytes + b'"]}'
    assert "limit" in error(client.post(CLASSIFY, content=big), 413)
    # The same limits hold on the other protocols' routes.
    error(
        client.post(
            "/v1/models/pos:predict", json={"instances": ["a"] * (s.max_texts_per_request + 1)}
        ),
        413,
    )
    big_v2 = {
        "inputs": [
            {
                "name": "text",
                "datatype": "BYTES",
                "shape": [1],
                "data": ["x" * (s.max_text_chars + 1)],
            }
        ]
    }
    error(client.post("/v2/models/pos/infer", json=big_v2), 413)
    # Exactly at the limits is fine.
    assert client.post(CLASSIFY, json={"texts": ["x" * s.max_text_chars]}).status_code == 200


def test_streamed_body_over_the_limit(client: httpx.Client, live_server: LiveServer) -> None:
    limit = live_server.settings.max_body_bytes

    def chunks() -> object:
        yield b'{"texts": ["'
        for _ in range(limit // 65536 + 2):
            yield b"a" * 65536
        yield b'"]}'

    r = client.post(CLASSIFY, content=chunks(), headers={"content-type": "application/json"})  # type: ignore[arg-type]
    assert "limit" in error(r, 413)


def test_empty_and_whitespace_texts_are_classified(client: httpx.Client) -> None:
    r = client.post(CLASSIFY, json={"texts": ["", "   ", "\n\t", "quickly"]})
    assert r.status_code == 200
    results = r.json()["results"]
    assert len(results) == 4
    # No tokens at all: the three answers are the model's answer to pure padding.
    assert results[0] == results[1] == results[2]


def test_the_server_still_serves(client: httpx.Client) -> None:
    assert client.get("/v2/health/ready").status_code == 200
    assert client.post(CLASSIFY, json={"texts": ["quickly"]}).status_code == 200


def test_openapi_documents_the_raw_body_routes(client: httpx.Client) -> None:
    import json
    import re

    import jsonschema  # type: ignore[import-untyped]

    doc = client.get("/openapi.json").json()
    schemas = doc["components"]["schemas"]
    assert set(re.findall(r'"#/components/schemas/([^"]+)"', json.dumps(doc))) <= set(schemas)
    posts = {
        p: ops["post"]
        for p, ops in doc["paths"].items()
        if "post" in ops and not p.startswith("/v2/repository/")  # admin: test_reliability_admin
    }
    assert set(posts) == {
        "/v1/classify",
        "/v1/models/{name}:classify",
        "/v1/models/{name}/versions/{version}:classify",
        "/v1/models/{name}:predict",
        "/v1/models/{name}/versions/{version}:predict",
        "/v2/models/{name}/infer",
        "/v2/models/{name}/versions/{version}/infer",
    }
    for op in posts.values():
        assert op["requestBody"]["content"]["application/json"]["schema"]["$ref"]
        assert {"400", "404", "413", "415", "503"} <= set(op["responses"])
    for ops in doc["paths"].values():
        for op in ops.values():
            assert "422" not in op["responses"]

    def validator(name: str) -> jsonschema.Draft202012Validator:
        root = {"$ref": f"#/components/schemas/{name}", "components": doc["components"]}
        return jsonschema.Draft202012Validator(root)

    classify = validator("ClassifyRequest")
    assert classify.is_valid({"texts": ["a"], "top_k": 2})
    assert not classify.is_valid({"texts": []})
    assert not classify.is_valid({"texts": ["a"], "extra": 1})
    infer = validator("V2InferRequest")
    assert infer.is_valid(
        {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": ["a"]}]}
    )
    assert not infer.is_valid({"inputs": "a"})
