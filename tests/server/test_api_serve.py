"""``textserve serve`` as a real process: flags, readiness, classification, graceful shutdown."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.server.conftest import free_port


def serve(*args: str) -> subprocess.Popen[str]:
    env = {**os.environ, "TEXTSERVE_LOG_LEVEL": "warning", "TF_CPP_MIN_LOG_LEVEL": "2"}
    return subprocess.Popen(
        [sys.executable, "-m", "server.cli", "serve", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def test_usage_and_config_errors_are_one_line(tmp_path: Path) -> None:
    proc = serve("--port", "99999")
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2
    assert "port" in err
    assert len(err.strip().splitlines()) == 1
    proc = serve("--repo", str(tmp_path / "missing"))
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 1
    assert "models.yaml: not found" in err
    (tmp_path / "models.yaml").write_text("models: [{name: 'bad name!'}]\n", encoding="utf-8")
    proc = serve("--repo", str(tmp_path))
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 1
    assert "models.yaml" in err
    assert "Traceback" not in err


@pytest.fixture
def served(small_repo: Path) -> Iterator[tuple[subprocess.Popen[str], str]]:
    port = free_port()
    proc = serve("--repo", str(small_repo), "--port", str(port), "--inference-threads", "1")
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.communicate()[1]
            try:
                if httpx.get(f"{url}/v2/health/ready", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "server not ready within 120 s"
            time.sleep(0.2)
        yield proc, url
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def test_serve_then_drain_on_sigterm(served: tuple[subprocess.Popen[str], str]) -> None:
    proc, url = served
    r = httpx.post(f"{url}/v1/models/pos:classify", json={"texts": ["quickly"]})
    assert r.status_code == 200
    assert r.json()["results"][0]["label"] in {"adj", "adv", "noun", "verb"}

    # A request in flight when SIGTERM arrives (its body is still being sent) is answered.
    release = threading.Event()

    def body() -> Iterator[bytes]:
        yield b'{"texts": ["slowly", '
        release.wait(30)
        yield b'"to run"]}'

    answer: dict[str, httpx.Response | BaseException] = {}

    def send() -> None:
        try:
            answer["r"] = httpx.post(
                f"{url}/v1/models/pos:classify",
                content=body(),
                headers={"content-type": "application/json"},
                timeout=60,
            )
        except BaseException as exc:
            answer["r"] = exc

    sender = threading.Thread(target=send)
    sender.start()
    time.sleep(0.5)  # the request line, headers and first chunk have reached the server
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    with pytest.raises(httpx.ConnectError):  # no longer accepting connections
        httpx.get(f"{url}/v2/health/live", timeout=5)
    release.set()
    sender.join(60)
    response = answer["r"]
    assert isinstance(response, httpx.Response), response
    assert response.status_code == 200
    assert len(response.json()["results"]) == 2
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
