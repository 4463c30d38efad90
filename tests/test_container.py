"""The Dockerfile and docker-compose.yml for real, with podman (no registry needed).

Needs podman and a base image: ``eval "$(../shared/tools/podman-setup.sh)"`` exports
``CONTAINERS_CONF`` and ``BASE_IMAGE`` (a local Debian bookworm + Python 3.11 stand-in for
python:3.11-slim); ``.ci/run`` does it. Without them every test here is skipped.

1. build the image (``--build-arg BASE_IMAGE``) and inspect it: non-root, exec-form entrypoint,
   health check, no compiler, no pip cache, no dev/toolchain packages;
2. run it with a model repository mounted read-only: ready, classify, /metrics, the image's
   HEALTHCHECK, graceful stop on SIGTERM;
3. ``podman-compose up``: requests through nginx spread over the replicas; Prometheus sees
   every replica; teardown.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

pytestmark = [pytest.mark.podman, pytest.mark.slow]

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker" / "docker-compose.yml"
IMAGE = "localhost/textserve:test"
READY_TIMEOUT_S = 300.0
BUILD_TIMEOUT_S = 1800.0
MODEL = "noun-topic"
TEXTS = ["a small domesticated carnivorous mammal", "the act of moving quickly on foot"]
# Packages of the [dev] and [toolchain] extras that must not be in the image.
NOT_IN_IMAGE = {"pytest", "ruff", "mypy", "scikit-learn", "matplotlib", "pyarrow", "httpx"}
RUNTIME_DEPS = {"tensorflow-cpu", "fastapi", "uvicorn", "prometheus-client", "orjson", "textserve"}


def run(
    args: list[str], env: dict[str, str], timeout: float, check: bool = True
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        args, env=env, capture_output=True, text=True, timeout=timeout, check=False, cwd=ROOT
    )
    if check and proc.returncode != 0:
        pytest.fail(f"{' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="module")
def engine() -> dict[str, str]:
    """The environment podman needs here; skips when podman or a base image is not set up."""
    if shutil.which("podman") is None:
        pytest.skip('podman absent: run eval "$(../shared/tools/podman-setup.sh)" (.ci/run does)')
    if not os.environ.get("BASE_IMAGE"):
        pytest.skip('BASE_IMAGE unset: run eval "$(../shared/tools/podman-setup.sh)" first')
    # BUILDAH_FORMAT=docker: keep HEALTHCHECK (the OCI image format has none), for
    # podman-compose's builds too.
    return {**os.environ, "BUILDAH_FORMAT": "docker"}


@pytest.fixture(scope="module")
def image(engine: dict[str, str]) -> str:
    started = time.monotonic()
    build_arg = f"BASE_IMAGE={engine['BASE_IMAGE']}"
    build = ["podman", "build", "--format", "docker", "--build-arg", build_arg]
    run([*build, "--target", "runtime", "-t", IMAGE, str(ROOT)], engine, BUILD_TIMEOUT_S)
    size = run(["podman", "image", "inspect", IMAGE, "--format", "{{.Size}}"], engine, 60)
    print(
        f"\nimage {IMAGE}: {int(size.stdout.strip()) / 1e9:.2f} GB, "
        f"built in {time.monotonic() - started:.0f} s"
    )
    return IMAGE


@pytest.fixture(scope="module")
def model_repo(small_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the test repository the container's non-root user can read."""
    repo = tmp_path_factory.mktemp("container") / "models"
    shutil.copytree(small_repo, repo)
    for path in [repo, *repo.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    return repo


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http(
    method: str, url: str, body: Any = None, timeout: float = 30
) -> tuple[int, bytes, dict[str, str]]:
    """(status, body, headers with lower-case names)."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(
        url, data=data, method=method, headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read(), {k.lower(): v for k, v in r.headers.items()}
    except urllib.error.HTTPError as e:
        with e:
            return e.code, e.read(), {k.lower(): v for k, v in e.headers.items()}


def labels_of(repo: Path, model: str) -> set[str]:
    labels: set[str] = set()
    for manifest in repo.glob(f"{model}/*/model.json"):
        labels.update(json.loads(manifest.read_text())["labels"])
    return labels


# -- 1. the image ----------------------------------------------------------------------------
_PROBE = """
import importlib.metadata as md, json, os, shutil
print(json.dumps({
    "uid": os.getuid(),
    "compilers": [c for c in ("gcc", "cc", "g++", "c++", "make") if shutil.which(c)],
    "pip_caches": [p for p in ("/root/.cache/pip", os.path.expanduser("~/.cache/pip"))
                   if os.path.exists(p)],
    "sources": os.path.exists("/src"),
    "dists": sorted({d.metadata["Name"].lower().replace("_", "-") for d in md.distributions()}),
}))
"""


def test_image_is_lean_and_runs_as_non_root(image: str, engine: dict[str, str]) -> None:
    raw = run(["podman", "image", "inspect", image], engine, 60).stdout
    (info,) = json.loads(raw)
    config = info["Config"]
    assert config["User"] == "10001:10001"
    assert config["Entrypoint"] == ["textserve", "serve"]
    env = dict(e.split("=", 1) for e in config["Env"])
    assert env["TEXTSERVE_HOST"] == "0.0.0.0"
    assert env["TEXTSERVE_REPO"] == "/models"
    assert "8000/tcp" in config["ExposedPorts"]
    assert "/models" in config["Volumes"]
    healthcheck = info.get("Healthcheck") or config.get("Healthcheck") or {}
    assert any("/v2/health/ready" in part for part in healthcheck.get("Test", []))

    out = run(
        ["podman", "run", "--rm", "--entrypoint", "python3", image, "-c", _PROBE], engine, 120
    ).stdout
    probe = json.loads(out.strip().splitlines()[-1])
    assert probe["uid"] == 10001
    assert probe["compilers"] == []
    assert probe["pip_caches"] == []
    assert probe["sources"] is False
    dists = set(probe["dists"])
    assert dists >= RUNTIME_DEPS, RUNTIME_DEPS - dists
    assert not dists & NOT_IN_IMAGE, dists & NOT_IN_IMAGE
    assert int(info["Size"]) < 2_500_000_000  # measured 1.54 GB: TensorFlow is most of it


# -- 2. one container ------------------------------------------------------------------------
def wait_ready(base: str, container: str, engine: dict[str, str]) -> float:
    started = time.monotonic()
    while time.monotonic() - started < READY_TIMEOUT_S:
        try:
            status, _, _ = http("GET", f"{base}/v2/health/ready", timeout=5)
            if status == 200:
                return time.monotonic() - started
        except OSError:
            pass
        state = run(
            ["podman", "inspect", container, "--format", "{{.State.Running}}"], engine, 60
        ).stdout.strip()
        if state != "true":
            logs = run(["podman", "logs", container], engine, 60, check=False)
            pytest.fail(f"container exited before ready:\n{logs.stdout}\n{logs.stderr}")
        time.sleep(1)
    logs = run(["podman", "logs", container], engine, 60, check=False)
    pytest.fail(f"not ready after {READY_TIMEOUT_S:.0f} s:\n{logs.stdout}\n{logs.stderr}")


@pytest.mark.parametrize("workers", [1, 2])
def test_container_serves_a_mounted_repository(
    image: str, engine: dict[str, str], model_repo: Path, workers: int
) -> None:
    # workers=2: the supervisor hands connections to its workers (server/balancer.py) and
    # TensorFlow's threads lower their priority, inside the container's restrictions.
    name = f"textserve-test-{os.getpid()}-{workers}"
    run(["podman", "rm", "-f", name], engine, 120, check=False)
    mount = f"{model_repo}:/models:ro"
    publish = ["-p", "127.0.0.1::8000", "-e", f"TEXTSERVE_WORKERS={workers}"]
    run(["podman", "run", "-d", "--name", name, *publish, "-v", mount, image], engine, 120)
    try:
        mapped = run(["podman", "port", name, "8000/tcp"], engine, 60).stdout.strip()
        base = f"http://{mapped.splitlines()[0]}"
        ready_s = wait_ready(base, name, engine)
        print(f"\ncontainer ready in {ready_s:.1f} s")

        status, body, _ = http("POST", f"{base}/v1/models/{MODEL}:classify", {"texts": TEXTS})
        assert status == 200, body
        answer = json.loads(body)
        assert answer["model"] == MODEL
        assert len(answer["results"]) == len(TEXTS)
        assert {r["label"] for r in answer["results"]} <= labels_of(model_repo, MODEL)

        status, body, _ = http("POST", f"{base}/v1/models/{MODEL}:classify", {"texts": "x"})
        assert status == 400, body  # bad input: a clear 4xx, the server stays up

        health = run(["podman", "healthcheck", "run", name], engine, 60, check=False)
        assert health.returncode == 0, health.stdout + health.stderr

        metrics_status, metrics_body, headers = http("GET", f"{base}/metrics")

        started = time.monotonic()
        run(["podman", "stop", "-t", "40", name], engine, 120)
        stop_s = time.monotonic() - started
        exit_code = run(
            ["podman", "inspect", name, "--format", "{{.State.ExitCode}}"], engine, 60
        ).stdout.strip()
        assert exit_code == "0", run(["podman", "logs", name], engine, 60, check=False).stderr
        assert stop_s < 30, f"SIGTERM did not stop the server promptly ({stop_s:.1f} s)"
    finally:
        run(["podman", "rm", "-f", name], engine, 120, check=False)

    assert metrics_status == 200
    assert headers.get("content-type", "").startswith("text/plain")
    families = {f.name for f in text_string_to_metric_families(metrics_body.decode())}
    assert {"textserve_build_info", "textserve_requests", "textserve_model_state"} <= families


# -- 3. the compose stack --------------------------------------------------------------------
def replica_names() -> list[str]:
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    return sorted(s for s in services if s.startswith("textserve"))


def last_upstream(header: str) -> str:
    """The replica that answered (X-Upstream lists every one tried, comma-separated)."""
    return header.split(",")[-1].strip()


def test_compose_spreads_requests_over_replicas(
    image: str, engine: dict[str, str], model_repo: Path
) -> None:
    project = f"tstest{os.getpid()}"
    http_port, prom_port = free_port(), free_port()
    env = {
        **engine,
        "TEXTSERVE_MODELS": str(model_repo),
        "TEXTSERVE_HTTP_PORT": str(http_port),
        "PROMETHEUS_PORT": str(prom_port),
    }
    compose_image = yaml.safe_load(COMPOSE.read_text())["services"][replica_names()[0]]["image"]
    run(["podman", "tag", image, compose_image], env, 60)  # compose builds only what is missing
    compose = ["podman-compose", "-p", project, "-f", str(COMPOSE)]
    replicas = replica_names()
    base = f"http://127.0.0.1:{http_port}"
    try:
        started = time.monotonic()
        run([*compose, "up", "-d"], env, BUILD_TIMEOUT_S)
        # every replica ready, as seen through nginx (a not-ready one answers 503 and nginx
        # retries the next; it is back in rotation 10 s after its last failure)
        ready: set[str] = set()
        while len(ready) < len(replicas):
            if time.monotonic() - started > READY_TIMEOUT_S + 120:
                logs = run([*compose, "logs"], env, 120, check=False)
                pytest.fail(f"replicas ready: {sorted(ready)}\n{logs.stdout[-5000:]}")
            try:
                status, _, headers = http("GET", f"{base}/v2/health/ready", timeout=5)
                if status == 200:
                    ready.add(last_upstream(headers.get("x-upstream", "")))
            except OSError:
                pass
            time.sleep(0.5)
        print(f"\ncompose: {len(replicas)} replicas ready in {time.monotonic() - started:.0f} s")

        answered: Counter[str] = Counter()
        for _ in range(10 * len(replicas)):
            status, body, headers = http(
                "POST", f"{base}/v1/models/{MODEL}:classify", {"texts": TEXTS}
            )
            assert status == 200, body
            assert len(json.loads(body)["results"]) == len(TEXTS)
            answered[last_upstream(headers["x-upstream"])] += 1
        assert len(answered) == len(replicas), answered
        assert min(answered.values()) >= 3, answered

        # Prometheus scrapes every replica's /metrics (not through nginx)
        assert http("GET", f"{base}/metrics")[0] == 200
        prom = f"http://127.0.0.1:{prom_port}/api/v1/targets"
        deadline = time.monotonic() + 90
        body = b""
        while True:
            try:
                status, body, _ = http("GET", prom, timeout=5)
                targets = [
                    t
                    for t in json.loads(body)["data"]["activeTargets"]
                    if t["labels"]["job"] == "textserve"
                ]
                instances = {t["labels"]["instance"].split(":")[0] for t in targets}
                healthy = {t["health"] for t in targets} == {"up"}
                if instances == set(replicas) and healthy:
                    break
            except (OSError, ValueError, KeyError):
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"Prometheus targets: {body[:2000]!r}")
            time.sleep(2)
    finally:
        run([*compose, "down"], env, 600, check=False)
        run(["podman", "network", "rm", "-f", f"{project}_default"], env, 120, check=False)
