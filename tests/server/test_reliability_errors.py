"""Bad input gets a clear 4xx on every inference route family, never a 5xx and never a crash.

One parametrised test crosses every kind of bad request with every route family: textserve's
native classify (unversioned and versioned), the multi-model ``/v1/classify``, TensorFlow
Serving's ``:predict`` and the V2 ``/infer``. Each family builds the same mistake in its own
body format; every answer must carry the family's error shape (``{"error": "..."}`` for all
three protocols), a message naming the problem, and the expected status. The server keeps
serving afterwards.
"""

from __future__ import annotations

import contextlib
import select
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

from server.api.deadline import TIMEOUT_HEADER
from tests.server.conftest import BROKEN, LiveServer

MODEL = "pos"


@dataclass(frozen=True)
class Family:
    """How one protocol spells a classify request."""

    name: str
    path: Callable[[str, str | None], str]
    """(model, version or None) → path. Families without a model in the path ignore both."""
    body: Callable[[str, Any], dict[str, Any]]
    """(model, texts) → the JSON body; ``texts`` may be anything (bad input included)."""
    missing: dict[str, Any]
    """A body without the required field."""
    wrong_type: Callable[[str], dict[str, Any]]
    """(model) → a body whose texts field has the wrong type."""
    bad_top_k: Callable[[str], dict[str, Any]]
    """(model) → a body with top_k (or its protocol's equivalent) out of range."""
    unknown_route: str
    prefix: bytes
    """The start of a valid body up to the first text's characters (for raw bodies)..."""
    suffix: bytes
    """... and what closes it after them."""
    model_in_body: bool = False


def _versioned(prefix: str, model: str, version: str | None) -> str:
    return f"{prefix}/{model}" if version is None else f"{prefix}/{model}/versions/{version}"


def _v2_body(model: str, texts: Any) -> dict[str, Any]:
    shape = [len(texts)] if isinstance(texts, list) else [1]
    return {"inputs": [{"name": "text", "datatype": "BYTES", "shape": shape, "data": texts}]}


FAMILIES = [
    Family(
        name="native",
        path=lambda m, v: _versioned("/v1/models", m, v) + ":classify",
        body=lambda m, t: {"texts": t},
        missing={"top_k": 1},
        wrong_type=lambda m: {"texts": "one text"},
        bad_top_k=lambda m: {"texts": ["a"], "top_k": 0},
        unknown_route="/v1/models/pos:classiffy",
        prefix=b'{"texts": ["',
        suffix=b'"]}',
    ),
    Family(
        name="native-multi",
        path=lambda m, v: "/v1/classify",
        body=lambda m, t: {"texts": t, "models": [m]},
        missing={"models": [MODEL]},
        wrong_type=lambda m: {"texts": {"a": 1}, "models": [m]},
        bad_top_k=lambda m: {"texts": ["a"], "models": [m], "top_k": 10**6},
        unknown_route="/v1/classifyy",
        prefix=b'{"models": ["pos"], "texts": ["',
        suffix=b'"]}',
        model_in_body=True,
    ),
    Family(
        name="tfserving",
        path=lambda m, v: _versioned("/v1/models", m, v) + ":predict",
        body=lambda m, t: {"instances": t},
        missing={"signature_name": "serving_default"},
        wrong_type=lambda m: {"instances": 7},
        bad_top_k=lambda m: {"instances": [{"b64": "not base64!"}]},
        unknown_route="/v1/models/pos:predikt",
        prefix=b'{"instances": ["',
        suffix=b'"]}',
    ),
    Family(
        name="v2",
        path=lambda m, v: _versioned("/v2/models", m, v) + "/infer",
        body=_v2_body,
        missing={"id": "1"},
        wrong_type=lambda m: {
            "inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": "a"}]
        },
        bad_top_k=lambda m: {
            **_v2_body(m, ["a"]),
            "outputs": [{"name": "probs", "parameters": {"classification": 0}}],
        },
        unknown_route="/v2/models/pos/inferr",
        prefix=b'{"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": ["',
        suffix=b'"]}]}',
    ),
]


@dataclass(frozen=True)
class Answer:
    status: int
    headers: httpx.Headers
    body: Any


def post(
    client: httpx.Client,
    family: Family,
    body: dict[str, Any] | bytes,
    *,
    model: str = MODEL,
    version: str | None = None,
    headers: dict[str, str] | None = None,
) -> Answer:
    path = family.path(model, version)
    if isinstance(body, bytes):
        sent = {"content-type": "application/json", **(headers or {})}
        r = client.post(path, content=body, headers=sent)
    else:
        r = client.post(path, json=body, headers=headers)
    return Answer(r.status_code, r.headers, r.json() if r.content else None)


def error_of(answer: Answer, status: int) -> str:
    """The protocol's error shape: JSON ``{"error": "<non-empty message>"}`` with ``status``."""
    assert answer.status == status, (answer.status, answer.body)
    assert answer.headers["content-type"] == "application/json"
    assert isinstance(answer.body, dict)
    assert list(answer.body) == ["error"], answer.body
    message = answer.body["error"]
    assert isinstance(message, str)
    assert message.strip()
    return message


def stream_until_answered(url: str, path: str, prefix: bytes, cap: int) -> tuple[int, int]:
    """POST a chunked body that never ends (``prefix`` then 'a's) until the server answers.

    Returns (status, bytes of body sent when the answer arrived). Gives up at ``cap`` bytes.
    """
    parts = urlsplit(url)
    sock = socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 80), timeout=30)
    try:
        sock.sendall(
            f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            "Transfer-Encoding: chunked\r\n\r\n".encode()
        )
        chunk = b"a" * 65536
        frame = b"%x\r\n%s\r\n" % (len(chunk), chunk)
        first = b"%x\r\n%s\r\n" % (len(prefix), prefix)
        sock.sendall(first)
        sent = len(prefix)
        sock.setblocking(False)
        answer = b""
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            readable, writable, _ = select.select([sock], [sock] if sent < cap else [], [], 1.0)
            if readable:
                try:
                    data = sock.recv(65536)
                except (BlockingIOError, InterruptedError):
                    continue
                except ConnectionResetError:
                    break
                if not data:
                    break
                answer += data
                if b"\r\n\r\n" in answer:
                    break
            elif writable:
                try:
                    sock.send(frame)  # partial writes only garble 'a's, never the framing we need
                except (BlockingIOError, InterruptedError):
                    continue
                except (BrokenPipeError, ConnectionResetError):
                    sock.setblocking(True)
                    sock.settimeout(5)
                    with contextlib.suppress(OSError):
                        answer += sock.recv(65536)
                    break
                sent += len(chunk)
        status_line = answer.split(b"\r\n", 1)[0].decode("latin-1")
        assert status_line.startswith("HTTP/1.1 "), (status_line, sent)
        return int(status_line.split()[1]), sent
    finally:
        sock.close()


CASES = [
    "not_json",
    "not_an_object",
    "invalid_utf8",
    "wrong_content_type",
    "missing_field",
    "wrong_type",
    "non_string_item",
    "empty_list",
    "empty_and_whitespace_texts",
    "text_over_limit",
    "too_many_texts",
    "body_over_limit_declared",
    "body_over_limit_streamed",
    "top_k_out_of_range",
    "bad_deadline_header",
    "unknown_model",
    "unknown_version",
    "model_not_ready",
    "unknown_route",
    "wrong_method",
]


def _params() -> list[Any]:
    out = []
    for family in FAMILIES:
        for case in CASES:
            if case == "unknown_version" and family.model_in_body:
                continue  # /v1/classify takes model names only, never a version
            out.append(pytest.param(family, case, id=f"{family.name}-{case}"))
    return out


@pytest.mark.parametrize(("family", "case"), _params())
def test_bad_input_is_a_clear_4xx(
    client: httpx.Client, live_server: LiveServer, family: Family, case: str
) -> None:
    s = live_server.settings
    ok = family.body(MODEL, ["a small dog"])
    if case == "not_json":
        assert "not valid JSON" in error_of(post(client, family, b"{texts: [1]"), 400)
    elif case == "not_an_object":
        assert "JSON object" in error_of(post(client, family, b'["a", "b"]'), 400)
    elif case == "invalid_utf8":
        raw = family.prefix + b"caf\xe9 \xff\xfe" + family.suffix
        assert "UTF-8" in error_of(post(client, family, raw), 400)
    elif case == "wrong_content_type":
        r = client.post(
            family.path(MODEL, None), content=b"texts=a", headers={"content-type": "text/plain"}
        )
        message = error_of(Answer(r.status_code, r.headers, r.json()), 415)
        assert "text/plain" in message
    elif case == "missing_field":
        message = error_of(post(client, family, family.missing), 400)
        assert any(word in message for word in ("texts", "instances", "inputs")), message
    elif case == "wrong_type":
        message = error_of(post(client, family, family.wrong_type(MODEL)), 400)
        assert "list" in message, message
    elif case == "non_string_item":
        message = error_of(post(client, family, family.body(MODEL, ["a", 3, "b"])), 400)
        assert "[1] must be a string" in message, message
    elif case == "empty_list":
        assert "must not be empty" in error_of(post(client, family, family.body(MODEL, [])), 400)
    elif case == "empty_and_whitespace_texts":
        # Decided and documented: classified, not rejected (the model sees only padding).
        answer = post(client, family, family.body(MODEL, ["", "   ", "\t\n", "a small dog"]))
        assert answer.status == 200, answer.body
    elif case == "text_over_limit":
        texts = ["fine", "x" * (s.max_text_chars + 1)]
        message = error_of(post(client, family, family.body(MODEL, texts)), 413)
        assert "[1]" in message, message
        assert str(s.max_text_chars) in message, message
    elif case == "too_many_texts":
        texts = ["a"] * (s.max_texts_per_request + 1)
        message = error_of(post(client, family, family.body(MODEL, texts)), 413)
        assert str(s.max_texts_per_request) in message, message
    elif case == "body_over_limit_declared":
        raw = family.prefix + b"a" * s.max_body_bytes + family.suffix
        assert str(s.max_body_bytes) in error_of(post(client, family, raw), 413)
    elif case == "body_over_limit_streamed":
        # A chunked body with no declared length is cut off as it streams: the server answers
        # 413 after about max_body_bytes, it never reads the 256 MiB the client would send.
        status, sent = stream_until_answered(
            live_server.url, family.path(MODEL, None), family.prefix, cap=256 * 2**20
        )
        assert status == 413
        assert sent < s.max_body_bytes + 16 * 2**20, sent
    elif case == "top_k_out_of_range":
        message = error_of(post(client, family, family.bad_top_k(MODEL)), 400)
        assert any(w in message for w in ("top_k", "classification", "base64")), message
    elif case == "bad_deadline_header":
        for value in ("soon", "0", "-5", "1.5", "9" * 40):
            answer = post(client, family, ok, headers={TIMEOUT_HEADER: value})
            assert TIMEOUT_HEADER in error_of(answer, 400)
    elif case == "unknown_model":
        answer = post(client, family, family.body("nope", ["a"]), model="nope")
        assert "nope" in error_of(answer, 404)
    elif case == "unknown_version":
        for version in ("9", "x1", "-1", "1.0"):
            answer = post(client, family, ok, version=version)
            assert version in error_of(answer, 404)
    elif case == "model_not_ready":
        answer = post(client, family, family.body(BROKEN, ["a"]), model=BROKEN)
        message = error_of(answer, 503)
        assert "FAILED" in message, message
        assert "model.pb" in message, message
        assert answer.headers["retry-after"] == "1"
    elif case == "unknown_route":
        r = client.post(family.unknown_route, json=ok)
        assert r.status_code == 404
        assert list(r.json()) == ["error"]
    elif case == "wrong_method":
        for method in ("GET", "PUT", "DELETE"):
            r = client.request(method, family.path(MODEL, None))
            assert r.status_code == 405, (method, r.status_code)
            assert r.headers["allow"] == "POST"
            assert method in r.json()["error"]
    else:  # pragma: no cover - a case name without a branch
        raise AssertionError(case)
    # Whatever the mistake, the same connection pool still gets answers.
    assert post(client, family, ok).status == 200


def test_every_case_was_exercised_on_every_family() -> None:
    ids = {p.id for p in _params()}
    assert len(ids) == len(FAMILIES) * len(CASES) - 1
    assert not [c for c in CASES if sum(c in i for i in ids) < len(FAMILIES) - 1]


def test_server_is_healthy_afterwards(client: httpx.Client) -> None:
    assert client.get("/v2/health/live").status_code == 200
    assert client.get("/v2/health/ready").status_code == 200
    r = client.post(f"/v1/models/{MODEL}:classify", json={"texts": ["to run quickly"]})
    assert r.status_code == 200
