"""docker/docker-compose.yml, nginx.conf and prometheus.yml agree, and the real tools accept them.

No container engine needed: compose is parsed, nginx.conf is checked with ``nginx -t`` and then
run for real (Debian's nginx) in front of three small stand-in upstreams on loopback, and
prometheus.yml is checked with ``promtool check config``.
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DOCKER = ROOT / "docker"
COMPOSE = DOCKER / "docker-compose.yml"
NGINX_CONF = DOCKER / "nginx.conf"
PROMETHEUS_YML = DOCKER / "prometheus.yml"
BASE_IMAGE_ARG = "${BASE_IMAGE:-python:3.11-slim}"
UPSTREAM_SERVER = re.compile(r"^\s*server\s+([\w.-]+):(\d+)\b([^;]*);", re.M)


def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict)
    return data


def replicas() -> dict[str, dict[str, Any]]:
    services: dict[str, dict[str, Any]] = compose()["services"]
    return {name: svc for name, svc in services.items() if name.startswith("textserve")}


def server_port() -> str:
    (port,) = re.findall(r"TEXTSERVE_PORT=(\d+)", (ROOT / "Dockerfile").read_text())
    return str(port)


def upstream_block(conf: str) -> str:
    m = re.search(r"upstream\s+textserve\s*\{(.*?)\}", conf, re.S)
    assert m, "nginx.conf has no `upstream textserve` block"
    return m.group(1)


# -- compose ---------------------------------------------------------------------------------
def test_compose_runs_several_replicas_of_one_image_on_one_read_only_repository() -> None:
    reps = replicas()
    assert len(reps) >= 3
    images = {svc["image"] for svc in reps.values()}
    assert len(images) == 1
    sources = set()
    for name, svc in reps.items():
        build = svc["build"]
        assert (DOCKER / build["context"]).resolve() == ROOT, name
        assert build.get("dockerfile", "Dockerfile") == "Dockerfile"
        assert build["args"]["BASE_IMAGE"] == BASE_IMAGE_ARG
        assert svc.get("hostname") == name
        (volume,) = svc["volumes"]
        source, target, mode = volume.rsplit(":", 2)
        assert (target, mode) == ("/models", "ro"), name
        sources.add(source)
    assert len(sources) == 1, f"replicas must share one model repository: {sources}"
    for name in ("nginx", "prometheus"):
        svc = compose()["services"][name]
        assert svc["build"]["args"]["BASE_IMAGE"] == BASE_IMAGE_ARG
        assert set(svc["depends_on"]) == set(reps)


# -- nginx -----------------------------------------------------------------------------------
def test_nginx_upstream_lists_every_replica_with_failure_handling() -> None:
    conf = NGINX_CONF.read_text()
    servers = UPSTREAM_SERVER.findall(upstream_block(conf))
    assert {(host, port) for host, port, _ in servers} == {(r, server_port()) for r in replicas()}
    for _, _, params in servers:
        assert re.search(r"max_fails=\d+", params)
        assert re.search(r"fail_timeout=\d+s", params)
    assert "proxy_next_upstream " in conf
    assert re.search(r"add_header\s+X-Upstream\s+\$upstream_addr\s+always;", conf)
    nginx_svc = compose()["services"]["nginx"]
    assert "./nginx.conf:/etc/nginx/nginx.conf:ro" in nginx_svc["volumes"]


@dataclass
class Stub:
    """A stand-in replica: answers every request with its name, or with ``status``."""

    name: str
    status: int = 200
    hits: Counter[str] = field(default_factory=Counter)
    server: ThreadingHTTPServer | None = None

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.server_address[1])


def start_stub(stub: Stub) -> None:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _answer(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            if length:
                self.rfile.read(length)
            stub.hits[self.command] += 1
            body = json.dumps({"replica": stub.name}).encode()
            self.send_response(stub.status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = _answer
        do_POST = _answer

        def log_message(self, format: str, *args: Any) -> None:
            pass

    stub.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    stub.server.daemon_threads = True
    threading.Thread(target=stub.server.serve_forever, daemon=True).start()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def adapt_nginx_conf(conf: str, prefix: Path, listen: int, upstreams: dict[str, int]) -> str:
    """The compose nginx.conf, runnable here: loopback ports, files under ``prefix``."""
    conf = re.sub(r"^pid\s+\S+;", f"pid {prefix}/nginx.pid;", conf, flags=re.M)
    # In the foreground, so the test's Popen handle is nginx's master and terminate() stops it.
    conf = "daemon off;\n" + conf
    conf = re.sub(r"access_log\s+/dev/stdout;", f"access_log {prefix}/access.log;", conf)
    conf = re.sub(r"listen\s+80;", f"listen 127.0.0.1:{listen};", conf)
    temp = "".join(
        f"\n    {kind}_temp_path {prefix}/{kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    conf = re.sub(r"^http\s*\{", "http {" + temp, conf, count=1, flags=re.M)

    def repl(m: re.Match[str]) -> str:
        return m.group(0).replace(
            f"{m.group(1)}:{m.group(2)}", f"127.0.0.1:{upstreams[m.group(1)]}"
        )

    return UPSTREAM_SERVER.sub(repl, conf)


def nginx_binary() -> str:
    path = shutil.which("nginx") or (
        "/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None
    )
    if path is None:
        pytest.skip("nginx absent (Debian package `nginx`): nginx.conf not checked")
    return path


def test_nginx_accepts_the_config(tmp_path: Path) -> None:
    nginx = nginx_binary()
    ports = {name: free_port() for name in replicas()}
    conf = adapt_nginx_conf(NGINX_CONF.read_text(), tmp_path, free_port(), ports)
    (tmp_path / "nginx.conf").write_text(conf)
    proc = subprocess.run(
        [nginx, "-t", "-e", "stderr", "-p", str(tmp_path), "-c", str(tmp_path / "nginx.conf")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "test is successful" in proc.stderr


@pytest.fixture
def balancer(tmp_path: Path) -> Iterator[tuple[str, dict[str, Stub]]]:
    """Real nginx with the compose nginx.conf in front of one stand-in per replica."""
    nginx = nginx_binary()
    stubs = {name: Stub(name) for name in replicas()}
    for stub in stubs.values():
        start_stub(stub)
    listen = free_port()
    conf = adapt_nginx_conf(
        NGINX_CONF.read_text(), tmp_path, listen, {n: s.port for n, s in stubs.items()}
    )
    (tmp_path / "nginx.conf").write_text(conf)
    proc = subprocess.Popen(
        [nginx, "-e", "stderr", "-p", str(tmp_path), "-c", str(tmp_path / "nginx.conf")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    base = f"http://127.0.0.1:{listen}"
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                with urllib.request.urlopen(f"{base}/nginx-health", timeout=2) as r:
                    assert r.status == 200
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    _, err = proc.communicate(timeout=5)
                    pytest.fail(f"nginx did not start: {err.decode()}")
                time.sleep(0.05)
        yield base, stubs
    finally:
        proc.terminate()
        proc.wait(timeout=20)
        assert proc.stderr is not None
        proc.stderr.close()
        for stub in stubs.values():
            assert stub.server is not None
            stub.server.shutdown()
            stub.server.server_close()


def send(base: str, path: str, body: bytes | None = None) -> tuple[int, str, str]:
    """(status, replica named in the body, X-Upstream header) for one request."""
    req = urllib.request.Request(
        base + path, data=body, headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            status, raw, upstream = r.status, r.read(), r.headers.get("X-Upstream", "")
    except urllib.error.HTTPError as e:
        status, raw, upstream = e.code, e.read(), e.headers.get("X-Upstream", "")
        e.close()
    return status, json.loads(raw).get("replica", ""), upstream


CLASSIFY = "/v1/models/topic:classify"
BODY = json.dumps({"texts": ["a small furry animal"]}).encode()


def test_nginx_spreads_requests_over_every_replica(
    balancer: tuple[str, dict[str, Stub]],
) -> None:
    base, stubs = balancer
    port_of = {f"127.0.0.1:{s.port}": name for name, s in stubs.items()}
    seen: Counter[str] = Counter()
    for _ in range(30):
        status, replica, upstream = send(base, CLASSIFY, BODY)
        assert status == 200
        assert port_of[upstream] == replica  # X-Upstream names the replica that answered
        seen[replica] += 1
    assert set(seen) == set(stubs)
    assert min(seen.values()) >= 5, seen  # round robin: 10 each


def test_nginx_retries_a_failing_replica_elsewhere_and_takes_it_out(
    balancer: tuple[str, dict[str, Stub]],
) -> None:
    base, stubs = balancer
    names = sorted(stubs)
    sick, dead = stubs[names[0]], stubs[names[1]]
    sick.status = 503  # overloaded / not ready
    assert dead.server is not None
    dead.server.shutdown()
    dead.server.server_close()  # connection refused
    healthy = set(names[2:])
    answered: Counter[str] = Counter()
    for _ in range(20):
        status, replica, upstream = send(base, CLASSIFY, BODY)  # POST: retried (no side effect)
        assert status == 200, (status, replica, upstream)
        answered[replica] += 1
    assert set(answered) == healthy
    # max_fails=2: after two failures each, the bad replicas are skipped for fail_timeout
    assert sick.hits["POST"] <= 2, sick.hits


def test_nginx_never_retries_admin_routes(balancer: tuple[str, dict[str, Stub]]) -> None:
    """/v2/repository/* changes one replica's state: its answer goes back as it is."""
    base, stubs = balancer
    sick = stubs[sorted(stubs)[0]]
    sick.status = 503
    statuses = Counter(send(base, "/v2/repository/models/topic/load", b"{}")[0] for _ in range(9))
    assert statuses[503] >= 1, statuses  # the sick replica's 503 reached the client
    assert statuses[200] >= 1, statuses
    assert sum(sum(s.hits.values()) for s in stubs.values()) == 9  # one attempt per request


# -- prometheus ------------------------------------------------------------------------------
def test_prometheus_scrapes_every_replica_and_promtool_accepts_it() -> None:
    config = yaml.safe_load(PROMETHEUS_YML.read_text())
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "textserve"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    targets = {t for sc in job["static_configs"] for t in sc["targets"]}
    assert targets == {f"{r}:{server_port()}" for r in replicas()}
    prom = compose()["services"]["prometheus"]
    assert "./prometheus.yml:/etc/prometheus/prometheus.yml:ro" in prom["volumes"]
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool absent (Debian package `prometheus`): prometheus.yml not checked")
    proc = subprocess.run(
        [promtool, "check", "config", str(PROMETHEUS_YML)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
