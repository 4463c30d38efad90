"""Hot reload without a restart: the admin routes, their bearer token, and zero failed requests.

A real server over a copy of the small repository (``pos`` and ``noun-topic``, version policy
``latest``) with an admin token. Several client threads classify with ``pos`` on every protocol
the whole time while a new version directory is picked up (loaded and warmed up before it
replaces the old one), another model is unloaded and loaded again, and a broken new version
fails to load (the old one keeps serving). Not one client request may fail.
"""

from __future__ import annotations

import shutil
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from server.settings import Settings
from tests.server.conftest import LiveServer, copy_repo, edit_models_yaml, run_server
from tests.server.test_reliability_models import edit_json

TOKEN = "s3cret-admin-token-for-tests"
AUTH = {"authorization": f"Bearer {TOKEN}"}
TEXTS = ["to run quickly", "a small brown bird", "very slowly"]


@pytest.fixture(scope="module")
def server(small_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    repo = copy_repo(small_repo, tmp_path_factory.mktemp("reload") / "repo")
    edit_models_yaml(
        repo,
        {
            "verb-topic": None,
            "pos": {"base_path": "pos", "version_policy": "latest"},
            "noun-topic": {"base_path": "noun-topic", "version_policy": "latest"},
        },
    )
    settings = Settings(_env_file=None, repo=repo, admin_token=TOKEN)
    with run_server(settings) as live:
        yield live


@pytest.fixture
def http(server: LiveServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=120) as c:
        yield c


def add_version(repo: Path, model: str, source: int, number: int) -> Path:
    dst = repo / model / str(number)
    shutil.copytree(repo / model / str(source), dst)
    edit_json(dst / "model.json", version=number)
    return dst


# -- authorisation --------------------------------------------------------------------------


ADMIN_CALLS = [
    ("/v2/repository/index", None),
    ("/v2/repository/models/pos/load", None),
    ("/v2/repository/models/pos/unload", None),
    ("/v2/repository/index", {"ready": True}),
]


def test_admin_is_disabled_without_a_configured_token(client: httpx.Client) -> None:
    """The session server has no admin token: every admin route answers 403, token or not."""
    for path, body in ADMIN_CALLS:
        for headers in ({}, AUTH, {"authorization": "Bearer"}):
            r = client.post(path, json=body, headers=headers)
            assert r.status_code == 403, (path, headers, r.text)
            assert "no admin token" in r.json()["error"]
    assert client.post("/v1/models/pos:classify", json={"texts": ["a"]}).status_code == 200


@pytest.mark.parametrize(
    "authorization",
    [
        None,
        "",
        "Bearer",
        f"Basic {TOKEN}",
        "Bearer wrong",
        f"Bearer {TOKEN[:-1]}",
        f"Bearer {TOKEN}x",
        f"Bearer {TOKEN.upper()}",
        f"Token {TOKEN}",
    ],
)
def test_admin_needs_the_bearer_token(http: httpx.Client, authorization: str | None) -> None:
    headers = {} if authorization is None else {"authorization": authorization}
    for path, body in ADMIN_CALLS:
        r = http.post(path, json=body, headers=headers)
        assert r.status_code == 401, (path, r.text)
        assert r.headers["www-authenticate"] == "Bearer"
        assert list(r.json()) == ["error"]
    # Nothing was unloaded by the refused calls.
    assert http.post("/v1/models/pos:classify", json={"texts": ["a"]}).status_code == 200


def test_admin_token_is_compared_in_constant_time() -> None:
    import inspect

    from server.api.routes import admin

    source = inspect.getsource(admin)
    assert "hmac.compare_digest(" in source
    assert "== expected" not in source


def test_index_and_bad_admin_bodies(http: httpx.Client) -> None:
    r = http.post("/v2/repository/index", headers=AUTH)
    assert r.status_code == 200
    index = {(e["name"], e.get("version")): e for e in r.json()}
    assert index[("pos", "2")]["state"] == "READY"
    assert index[("noun-topic", "2")]["state"] == "READY"
    ready = http.post("/v2/repository/index", json={"ready": True}, headers=AUTH).json()
    assert all(e["state"] == "READY" for e in ready)
    for path, body in (
        ("/v2/repository/index", {"ready": "yes"}),
        ("/v2/repository/index", {"nope": 1}),
        ("/v2/repository/models/pos/load", {"parameters": {"config": "{}"}}),
        ("/v2/repository/models/pos/unload", {"parameters": 3}),
    ):
        r = http.post(path, json=body, headers=AUTH)
        assert r.status_code == 400, (path, r.text)
        assert list(r.json()) == ["error"]
    r = http.post("/v2/repository/index", content=b"{nope", headers=AUTH)
    assert r.status_code == 400
    assert http.post("/v2/repository/models/nope/load", headers=AUTH).status_code == 404
    assert http.post("/v2/repository/models/nope/unload", headers=AUTH).status_code == 404
    assert http.get("/v2/repository/index", headers=AUTH).status_code == 405


def test_tritonclient_repository_api(server: LiveServer) -> None:
    client = triton.InferenceServerClient(url=server.url.removeprefix("http://"))
    try:
        index = client.get_model_repository_index(headers=AUTH)
        assert {"name": "pos", "version": "2", "state": "READY", "reason": ""} in index
        client.unload_model("noun-topic", headers=AUTH)
        assert not client.is_model_ready("noun-topic")
        client.load_model("noun-topic", headers=AUTH)
        assert client.is_model_ready("noun-topic")
        with pytest.raises(InferenceServerException):
            client.load_model("pos")  # no token
    finally:
        client.close()


# -- reloads under load -----------------------------------------------------------------------


def _request(i: int) -> tuple[str, dict[str, Any]]:
    """Requests cycling over every protocol's route, all served by ``pos``."""
    kind = i % 4
    if kind == 0:
        return "/v1/models/pos:classify", {"texts": TEXTS, "top_k": 2}
    if kind == 1:
        return "/v1/models/pos:predict", {"instances": TEXTS}
    if kind == 2:
        data = {"name": "text", "datatype": "BYTES", "shape": [len(TEXTS)], "data": TEXTS}
        return "/v2/models/pos/infer", {"inputs": [data]}
    return "/v1/classify", {"texts": TEXTS, "models": ["pos"]}


@dataclass
class Load:
    """Client threads classifying with ``pos`` until stopped; every answer is recorded."""

    url: str
    clients: int = 4
    stop: threading.Event = field(default_factory=threading.Event)
    statuses: Counter[int] = field(default_factory=Counter)
    versions: Counter[str] = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    threads: list[threading.Thread] = field(default_factory=list)

    def run(self, worker: int) -> None:
        with httpx.Client(base_url=self.url, timeout=60) as c:
            i = worker
            while not self.stop.is_set():
                path, body = _request(i)
                i += 1
                try:
                    r = c.post(path, json=body)
                except httpx.HTTPError as exc:
                    with self.lock:
                        self.failures.append(f"{path}: {type(exc).__name__}: {exc}")
                    continue
                with self.lock:
                    self.statuses[r.status_code] += 1
                    if r.status_code != 200:
                        self.failures.append(f"{path}: {r.status_code} {r.text[:200]}")
                    elif path.endswith(":classify"):
                        self.versions[r.json()["version"]] += 1
                    elif path.endswith("/infer"):
                        self.versions[r.json()["model_version"]] += 1

    def __enter__(self) -> Load:
        for w in range(self.clients):
            t = threading.Thread(target=self.run, args=(w,), daemon=True)
            t.start()
            self.threads.append(t)
        self.wait_for(20)
        return self

    def wait_for(self, n: int) -> None:
        """Block until ``n`` more answers arrived (the clients are really running)."""
        start = sum(self.statuses.values())
        deadline = time.monotonic() + 60
        while sum(self.statuses.values()) < start + n and not self.failures:
            assert time.monotonic() < deadline, "the clients made no progress"
            time.sleep(0.01)

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(60)


def _states(http: httpx.Client, name: str) -> dict[str, str]:
    info = http.get(f"/v1/models/{name}").json()
    return {v["version"]: v["state"] for v in info["versions"]}


@dataclass
class SlowRequest:
    """A request whose body is held back: the server resolves the model version when the
    headers arrive, and submits the texts only when the rest of the body comes."""

    url: str
    path: str
    head: bytes
    tail: bytes
    release: threading.Event = field(default_factory=threading.Event)
    answer: list[httpx.Response | BaseException] = field(default_factory=list)

    def body(self) -> Iterator[bytes]:
        yield self.head
        self.release.wait(60)
        yield self.tail

    def send(self) -> None:
        try:
            r = httpx.post(
                self.url + self.path,
                content=self.body(),
                headers={"content-type": "application/json"},
                timeout=60,
            )
            self.answer.append(r)
        except BaseException as exc:
            self.answer.append(exc)

    def start(self) -> threading.Thread:
        t = threading.Thread(target=self.send, daemon=True)
        t.start()
        return t

    def finish(self, thread: threading.Thread) -> httpx.Response:
        self.release.set()
        thread.join(60)
        (r,) = self.answer
        assert isinstance(r, httpx.Response), r
        return r


def test_reload_and_unload_under_load_fail_no_request(
    http: httpx.Client, server: LiveServer
) -> None:
    repo = server.repo
    # Requests that resolve version 2 now and submit after version 2 is gone: they follow the
    # reload to version 3 instead of failing.
    held = [
        SlowRequest(server.url, "/v1/models/pos:classify", b'{"texts": ["to run", ', b'"x"]}'),
        SlowRequest(
            server.url,
            "/v2/models/pos/infer",
            b'{"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], ',
            b'"data": ["a bird"]}]}',
        ),
    ]
    threads = [h.start() for h in held]
    time.sleep(0.5)  # the headers and the first chunk have reached the server
    with Load(server.url) as load:
        # A new version directory is picked up by a load of the (loaded) model: version 3 is
        # loaded and warmed up, then replaces version 2.
        add_version(repo, "pos", 2, 3)
        r = http.post("/v2/repository/models/pos/load", headers=AUTH)
        assert r.status_code == 200, r.text
        assert r.json()["state"] == "READY"
        assert [v["version"] for v in r.json()["versions"]] == ["3"]
        native, v2 = (h.finish(t) for h, t in zip(held, threads, strict=True))
        assert native.status_code == 200, native.text
        assert native.json()["version"] == "3"
        assert len(native.json()["results"]) == 2
        assert v2.status_code == 200, v2.text
        assert v2.json()["model_version"] == "3"
        load.wait_for(40)
        # Unloading another model while pos is busy.
        r = http.post("/v2/repository/models/noun-topic/unload", headers=AUTH)
        assert r.status_code == 200, r.text
        assert r.json()["state"] == "UNAVAILABLE"
        assert r.json()["versions"] == []
        load.wait_for(40)
        # A broken new version: the load fails, version 3 keeps serving.
        broken = add_version(repo, "pos", 2, 4)
        (broken / "model.pb").unlink()
        (broken / "model.pb").write_bytes(b"\x00 not a graph")
        r = http.post("/v2/repository/models/pos/load", headers=AUTH)
        assert r.status_code == 400, r.text
        message = r.json()["error"]
        assert "version 4" in message
        assert "GraphDef" in message
        assert "version 3 keeps serving" in message
        load.wait_for(40)
        # Loading the other model again, and retiring the broken directory.
        r = http.post("/v2/repository/models/noun-topic/load", headers=AUTH)
        assert r.status_code == 200, r.text
        shutil.rmtree(broken)
        r = http.post("/v2/repository/models/pos/load", headers=AUTH)
        assert r.status_code == 200, r.text
        load.wait_for(40)
    assert not load.failures, load.failures[:5]
    assert set(load.statuses) == {200}
    assert load.versions["2"] > 0
    assert load.versions["3"] > 0
    assert set(load.versions) == {"2", "3"}
    assert _states(http, "pos") == {"3": "READY"}
    assert _states(http, "noun-topic") == {"2": "READY"}
    total = sum(load.statuses.values())
    assert total >= 160, total


def test_unloaded_model_answers_503_then_serves_after_load(http: httpx.Client) -> None:
    assert http.post("/v2/repository/models/noun-topic/unload", headers=AUTH).status_code == 200
    r = http.post("/v1/models/noun-topic:classify", json={"texts": ["a cat"]})
    assert r.status_code == 503
    assert "UNAVAILABLE" in r.json()["error"]
    assert r.headers["retry-after"] == "1"
    assert http.get("/v2/models/noun-topic/ready").status_code == 400
    index = http.post("/v2/repository/index", headers=AUTH).json()
    assert {"name": "noun-topic", "state": "UNAVAILABLE", "reason": ""} in index
    assert http.post("/v2/repository/models/noun-topic/load", headers=AUTH).status_code == 200
    r = http.post("/v1/models/noun-topic:classify", json={"texts": ["a cat"]})
    assert r.status_code == 200
    assert http.get("/v2/models/noun-topic/ready").json() == {"name": "noun-topic", "ready": True}


def test_a_model_added_to_models_yaml_is_loaded_by_name(
    http: httpx.Client, server: LiveServer
) -> None:
    assert http.post("/v1/models/verb-topic:classify", json={"texts": ["x"]}).status_code == 404
    edit_models_yaml(server.repo, {"verb-topic": {"base_path": "verb-topic"}})
    try:
        r = http.post("/v2/repository/models/verb-topic/load", headers=AUTH)
        assert r.status_code == 200, r.text
        r = http.post("/v1/models/verb-topic:classify", json={"texts": ["to run quickly"]})
        assert r.status_code == 200
        assert r.json()["version"] == "2"
    finally:
        edit_models_yaml(server.repo, {"verb-topic": None})
