"""Run ``wrk`` (one thread) with ``bench/post.lua`` and read the JSON its ``done()`` hook prints."""

from __future__ import annotations

import json
import resource
import shutil
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

POST_LUA = Path(__file__).with_name("post.lua")
MARKER = "WRK_JSON "


@dataclass(frozen=True)
class WrkResult:
    connections: int
    texts_per_request: int
    duration_s: float
    requests: int
    """Responses received (any status)."""
    non_2xx: int
    socket_errors: int
    """Connect, read, write errors and timeouts."""
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    mean_ms: float
    wrk_cpu_s: float
    """CPU seconds (user + system) wrk itself used."""

    @property
    def ok_requests(self) -> int:
        return self.requests - self.non_2xx

    @property
    def texts_per_s(self) -> float:
        return self.ok_requests * self.texts_per_request / self.duration_s

    @property
    def requests_per_s(self) -> float:
        return self.ok_requests / self.duration_s

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["texts_per_s"] = self.texts_per_s
        d["requests_per_s"] = self.requests_per_s
        return d


def wrk_binary() -> str:
    path = shutil.which("wrk")
    if path is None:
        raise FileNotFoundError(2, "wrk is not installed (Debian package wrk)", "wrk")
    return path


def parse_output(stdout: str) -> dict[str, Any]:
    """The JSON object post.lua's ``done()`` printed."""
    for line in stdout.splitlines():
        if line.startswith(MARKER):
            data: dict[str, Any] = json.loads(line[len(MARKER) :])
            return data
    raise RuntimeError(f"wrk printed no {MARKER.strip()} line:\n{stdout[-2000:]}")


def run_wrk(
    url: str,
    bodies: Path,
    *,
    connections: int,
    duration_s: float,
    texts_per_request: int,
    timeout_s: float = 30.0,
) -> WrkResult:
    """POST ``bodies`` to ``url`` from ``connections`` connections for ``duration_s`` seconds."""
    cmd = [
        wrk_binary(),
        "-t1",
        f"-c{connections}",
        f"-d{max(1, round(duration_s))}s",
        f"--timeout={max(1, round(timeout_s))}s",
        "-s",
        str(POST_LUA),
        url,
        "--",
        str(bodies),
    ]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=duration_s + timeout_s + 30, check=False
    )
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise RuntimeError(f"wrk failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
    data = parse_output(proc.stdout)
    errors = data["errors"]
    lat = data["latency_us"]
    return WrkResult(
        connections=connections,
        texts_per_request=texts_per_request,
        duration_s=data["duration_us"] / 1e6,
        requests=int(data["requests"]),
        non_2xx=int(errors["status"]),
        socket_errors=int(errors["connect"] + errors["read"] + errors["write"] + errors["timeout"]),
        p50_ms=lat["p50"] / 1000,
        p90_ms=lat["p90"] / 1000,
        p99_ms=lat["p99"] / 1000,
        max_ms=lat["max"] / 1000,
        mean_ms=lat["mean"] / 1000,
        wrk_cpu_s=(after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime),
    )
