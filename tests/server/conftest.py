"""Fixtures for the serving core: a copy of the small repository with a broken model added, and
a REAL uvicorn server (``textserve serve``'s uvicorn options) on a free port.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import uvicorn
import yaml

from server.artifact import MODELS_YAML
from server.commands.serve import uvicorn_options
from server.registry import Registry
from server.settings import Settings

BROKEN = "broken"
"""A model whose version directory holds a corrupt ``model.pb``: FAILED, never READY."""
SMALL_BATCH = "pos-small-batch"
"""The ``pos`` model again, with a models.yaml batching override (``max_batch_size: 8``)."""


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def copy_repo(src: Path, dst: Path) -> Path:
    """A private copy of a repository (hard links where possible: the fixture is read-only)."""
    shutil.copytree(src, dst, copy_function=_link_or_copy)
    # models.yaml is rewritten by tests: give the copy its own file, not a link.
    (dst / MODELS_YAML).unlink()
    shutil.copy2(src / MODELS_YAML, dst / MODELS_YAML)
    return dst


def edit_models_yaml(repo: Path, edit: dict[str, dict[str, object] | None]) -> None:
    """Add/replace (dict) or remove (None) models in ``repo/models.yaml``, by name."""
    path = repo / MODELS_YAML
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    models = {m["name"]: m for m in data.get("models", [])}
    for name, value in edit.items():
        if value is None:
            models.pop(name, None)
        else:
            models[name] = {"name": name, **value}
    data["models"] = list(models.values())
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")


def add_broken_model(repo: Path, source: str = "noun-topic/2", name: str = BROKEN) -> Path:
    """Copy a frozen version as ``name/1`` and corrupt its graph file."""
    version_dir = repo / name / "1"
    shutil.copytree(repo / source, version_dir)
    graph = version_dir / "model.pb"
    graph.unlink()  # it may be a hard link into the shared fixture
    graph.write_bytes(b"\x08\x01 this is not a GraphDef \xff\xfe")
    edit_models_yaml(repo, {name: {"base_path": name, "version_policy": "latest"}})
    return version_dir


@pytest.fixture(scope="session")
def served_repo(small_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """small_repo + a broken model + a batching override, for the API tests (read-only)."""
    repo = copy_repo(small_repo, tmp_path_factory.mktemp("served") / "repo")
    add_broken_model(repo)
    edit_models_yaml(
        repo,
        {
            SMALL_BATCH: {
                "base_path": "pos",
                "version_policy": "latest",
                "batching": {"max_batch_size": 8, "max_wait_ms": 1.0},
            }
        },
    )
    return repo


@dataclass
class LiveServer:
    url: str
    registry: Registry
    settings: Settings
    repo: Path


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def run_server(settings: Settings, *, wait_loaded: bool = True) -> Iterator[LiveServer]:
    """uvicorn serving ``create_app(settings)`` in a thread, on a socket bound to a free port.

    Yields once the server accepts connections (and, with ``wait_loaded``, once the first load
    pass is over); shuts it down gracefully (lifespan shutdown included) afterwards.
    """
    from server.api.app import create_app

    app = create_app(settings)
    config = uvicorn.Config(
        app,
        **uvicorn_options(),
        access_log=False,
        log_level="warning",
        timeout_graceful_shutdown=5,
    )
    server = uvicorn.Server(config)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    registry: Registry = app.state.registry
    deadline = time.monotonic() + 120
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError("uvicorn exited during startup")
        if time.monotonic() > deadline:
            raise TimeoutError("uvicorn did not start within 120 s")
        time.sleep(0.02)
    while wait_loaded and not registry.loaded:
        if time.monotonic() > deadline:
            raise TimeoutError("models did not load within 120 s")
        time.sleep(0.05)
    try:
        yield LiveServer(url=url, registry=registry, settings=settings, repo=Path(settings.repo))
    finally:
        server.should_exit = True
        thread.join(60)
        sock.close()
        if thread.is_alive():
            raise RuntimeError("uvicorn did not shut down within 60 s")


@pytest.fixture(scope="session")
def live_server(served_repo: Path) -> Iterator[LiveServer]:
    """One real server over ``served_repo`` for the whole session (default settings)."""
    settings = Settings(_env_file=None, repo=served_repo, inference_threads=2)
    with run_server(settings) as live:
        yield live


@pytest.fixture
def client(live_server: LiveServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=live_server.url, timeout=30) as c:
        yield c
