"""GET /metrics of the real server: promtool-clean, counters that move with the requests served
(errors counted with their status), and a real Prometheus scraping it."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from server import __version__
from server.metrics import RequestRecord
from server.registry import VersionState
from tests.server.conftest import BROKEN, LiveServer, free_port

PROMTOOL = "/usr/bin/promtool"
PROMETHEUS = "/usr/bin/prometheus"
COMPOSE_PROMETHEUS_YML = Path(__file__).parents[2] / "docker" / "prometheus.yml"
CLASSIFY = "/v1/models/{name}:classify"

Labels = frozenset[tuple[str, str]]
Samples = dict[tuple[str, Labels], float]


def scrape(client: httpx.Client) -> Samples:
    """Every sample of ``GET /metrics``: (sample name, labels) → value."""
    r = client.get("/metrics")
    assert r.status_code == 200
    out: Samples = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float:
    """The sample's value, 0 when the series does not exist (yet)."""
    return samples.get((name, frozenset(labels.items())), 0.0)


def series(samples: Samples, name: str) -> list[Mapping[str, str]]:
    return [dict(labels) for (n, labels) in samples if n == name]


def classify(client: httpx.Client, model: str, texts: list[str]) -> httpx.Response:
    return client.post(f"/v1/models/{model}:classify", json={"texts": texts})


def test_metrics_output_passes_promtool(client: httpx.Client) -> None:
    if not Path(PROMTOOL).exists():
        pytest.skip(f"{PROMTOOL} is absent (Debian package prometheus)")
    assert classify(client, "pos", ["the cat sat"]).status_code == 200
    assert classify(client, "no-such-model", ["x"]).status_code == 404
    r = client.get("/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain; version=")
    lint = subprocess.run(
        [PROMTOOL, "check", "metrics"], input=r.content, capture_output=True, timeout=30
    )
    assert lint.returncode == 0, lint.stdout.decode() + lint.stderr.decode()
    # every family textserve exports is there, from the real server
    names = {f.name for f in text_string_to_metric_families(r.text)}
    for family in (
        "textserve_requests",
        "textserve_texts",
        "textserve_request_duration_seconds",
        "textserve_queue_wait_seconds",
        "textserve_inference_duration_seconds",
        "textserve_batch_size",
        "textserve_queue_depth",
        "textserve_model_state",
        "textserve_model_load_duration_seconds",
        "textserve_model_warmup_duration_seconds",
        "textserve_model_memory_bytes",
        "textserve_process_memory_bytes",
        "textserve_build_info",
    ):
        assert family in names


def test_counters_move_with_the_requests_served(client: httpx.Client) -> None:
    texts = ["a small dog barks", "to run quickly", "green"]
    before = scrape(client)
    served = {classify(client, "pos", texts).json()["version"] for _ in range(4)}
    assert len(served) == 1
    version = served.pop()
    predict = client.post("/v1/models/pos:predict", json={"instances": texts[:2]})
    assert predict.status_code == 200
    infer = client.post(
        "/v2/models/pos/infer",
        json={"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": ["x"]}]},
    )
    assert infer.status_code == 200
    after = scrape(client)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    pos = {"model": "pos", "version": version}
    for route, n in (
        (CLASSIFY, 4),
        ("/v1/models/{name}:predict", 1),
        ("/v2/models/{name}/infer", 1),
    ):
        assert delta("textserve_requests_total", route=route, status="200", **pos) == n
        assert delta("textserve_request_duration_seconds_count", route=route, **pos) == n
        assert delta("textserve_request_duration_seconds_sum", route=route, **pos) > 0
    sent = 4 * len(texts) + 2 + 1
    assert delta("textserve_texts_total", **pos) == sent
    # every text went through pos's batcher: batches are counted, their sizes add up
    batches = delta("textserve_batch_size_count", **pos)
    assert 6 <= batches <= sent
    assert delta("textserve_batch_size_sum", **pos) == sent
    assert delta("textserve_inference_duration_seconds_count", **pos) == batches
    assert delta("textserve_inference_duration_seconds_sum", **pos) > 0
    assert delta("textserve_queue_wait_seconds_count", **pos) == 6  # one per request
    assert value(after, "textserve_queue_depth", **pos) == 0
    # the scrape before this one is counted too
    assert delta("textserve_requests_total", model="", version="", route="/metrics", status="200")


def test_errors_are_counted_with_their_status(client: httpx.Client) -> None:
    version = classify(client, "pos", ["x"]).json()["version"]
    before = scrape(client)
    assert client.post("/v1/models/pos:classify", content=b"{not json").status_code == 400
    assert classify(client, "pos", []).status_code == 400
    assert classify(client, "pos", ["x"] * 5000).status_code == 413
    assert (
        client.post(
            "/v1/models/pos:classify", content=b"x", headers={"content-type": "text/plain"}
        ).status_code
        == 415
    )
    assert classify(client, "an-unknown-model", ["x"]).status_code == 404
    unknown_version = client.post("/v1/models/pos/versions/77:classify", json={"texts": ["x"]})
    assert unknown_version.status_code == 404
    assert classify(client, BROKEN, ["x"]).status_code == 503
    assert client.get("/v1/models/pos:classify").status_code == 405
    assert client.get("/no/such/route").status_code == 404
    after = scrape(client)

    def delta(**labels: str) -> float:
        name = "textserve_requests_total"
        return value(after, name, **labels) - value(before, name, **labels)

    pos = {"model": "pos", "version": version, "route": CLASSIFY}
    assert delta(status="400", **pos) == 2
    assert delta(status="413", **pos) == 1
    assert delta(status="415", **pos) == 1
    # unknown model: no label value from the URL; unknown version of a known model: name only
    assert delta(model="", version="", route=CLASSIFY, status="404") == 1
    assert (
        delta(
            model="pos",
            version="",
            route="/v1/models/{name}/versions/{version}:classify",
            status="404",
        )
        == 1
    )
    assert delta(model=BROKEN, version="", route=CLASSIFY, status="503") == 1
    assert delta(model="pos", version="", route=CLASSIFY, status="405") == 1  # path name
    assert delta(model="", version="", route="", status="404") == 1
    assert not any("an-unknown-model" in str(labels) for _, labels in after)
    assert not any("no/such" in str(labels) for _, labels in after)
    # errors classify nothing
    assert value(after, "textserve_texts_total", model="pos", version=version) == value(
        before, "textserve_texts_total", model="pos", version=version
    )


def test_request_record_labels() -> None:
    """How a request's record turns into labels (the data plane fills it, see dataplane.py)."""
    single = RequestRecord()
    single.resolved("pos", "1")
    single.classified("pos", "2", 3)  # followed a hot reload from version 1 to 2
    assert single.models == {("pos", "2"): 3}
    many = RequestRecord()
    for name in ("pos", "verb-topic"):
        many.resolved(name, "2")
        many.classified(name, "2", 2)
    assert many.models == {("pos", "2"): 2, ("verb-topic", "2"): 2}
    unready = RequestRecord()
    unready.resolved(BROKEN, "")
    assert unready.models == {(BROKEN, ""): 0}


def test_model_gauges_and_build_info(client: httpx.Client, live_server: LiveServer) -> None:
    samples = scrape(client)
    registry = live_server.registry
    versions = [mv for e in registry.entries() for mv in registry.versions(e.name)]
    assert any(mv.state is VersionState.READY for mv in versions)
    for mv in versions:
        labels = {"model": mv.name, "version": str(mv.version)}
        current = str(mv.state).lower()
        assert value(samples, "textserve_model_state", state=current, **labels) == 1
        others = [
            s
            for s in series(samples, "textserve_model_state")
            if s["model"] == mv.name and s["version"] == str(mv.version) and s["state"] != current
        ]
        assert others
        assert all(value(samples, "textserve_model_state", **s) == 0 for s in others)
        if mv.state is VersionState.READY:
            assert mv.stats is not None
            load = value(samples, "textserve_model_load_duration_seconds", **labels)
            assert load == pytest.approx(mv.stats.load_seconds)
            assert load > 0
            warm = value(samples, "textserve_model_warmup_duration_seconds", **labels)
            assert warm == pytest.approx(mv.stats.warmup_seconds)
            assert warm > 0
    failed = [mv for mv in versions if mv.name == BROKEN]
    assert failed
    assert all(mv.state is VersionState.FAILED for mv in failed)
    (info,) = series(samples, "textserve_build_info")
    assert info["version"] == __version__
    assert info["tensorflow_version"].startswith("2.")
    assert value(samples, "textserve_build_info", **info) == 1
    for kind in ("rss", "uss", "pss"):
        assert value(samples, "textserve_process_memory_bytes", kind=kind) > 0


def test_memory_gauges_match_the_memory_report(client: httpx.Client) -> None:
    report = client.get("/v1/memory").json()
    samples = scrape(client)
    assert report["models"]
    for m in report["models"]:
        labels = {"model": m["model"], "version": str(m["version"])}
        gauge = "textserve_model_memory_bytes"
        assert value(samples, gauge, kind="own", **labels) == m["own_bytes"]
        assert value(samples, gauge, kind="attributed", **labels) == m["attributed_bytes"]
        assert value(samples, gauge, kind="embedding_share", **labels) == (
            m["embedding"]["share_bytes"] if m["embedding"] else 0
        )
        assert value(samples, gauge, kind="rss_growth", **labels) == m["load"]["rss_growth_bytes"]


# -- a real Prometheus ----------------------------------------------------------------------------


def prometheus_config(textserve: str, own: str) -> dict[str, Any]:
    """docker/prometheus.yml with its targets rewritten to loopback and a 1 s scrape interval."""
    config: dict[str, Any] = yaml.safe_load(COMPOSE_PROMETHEUS_YML.read_text(encoding="utf-8"))
    config["global"]["scrape_interval"] = "1s"
    config["global"]["scrape_timeout"] = "1s"
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert set(jobs) == {"textserve", "prometheus"}, "the compose config changed: adapt the test"
    for job, target in (("textserve", textserve), ("prometheus", own)):
        (static,) = jobs[job]["static_configs"]
        static["targets"] = [target]
    return config


@pytest.fixture
def prometheus(live_server: LiveServer, tmp_path: Path) -> Iterator[str]:
    """A real Prometheus scraping the live server; yields its URL. Killed at the end."""
    if shutil.which(PROMETHEUS) is None:
        pytest.skip(f"{PROMETHEUS} is absent (Debian package prometheus)")
    port = free_port()
    own = f"127.0.0.1:{port}"
    target = live_server.url.removeprefix("http://")
    config = tmp_path / "prometheus.yml"
    config.write_text(yaml.safe_dump(prometheus_config(target, own)), encoding="utf-8")
    log = (tmp_path / "prometheus.log").open("wb")
    proc = subprocess.Popen(
        [
            PROMETHEUS,
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address={own}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        yield f"http://{own}"
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        log.close()


def test_a_real_prometheus_scrapes_the_server(
    prometheus: str, client: httpx.Client, tmp_path: Path
) -> None:
    assert classify(client, "pos", ["scraped by prometheus"]).status_code == 200
    deadline = time.monotonic() + 25
    health: dict[str, str] = {}
    result: list[dict[str, Any]] = []
    with httpx.Client(base_url=prometheus, timeout=5) as api:
        while time.monotonic() < deadline:
            try:
                answer = api.get("/api/v1/targets")
                if answer.status_code != 200:  # 503 "Service Unavailable" until it is ready
                    time.sleep(0.3)
                    continue
                targets = answer.json()["data"]["activeTargets"]
                health = {t["labels"]["job"]: t["health"] for t in targets}
                if health.get("textserve") == "up":
                    query = api.get(
                        "/api/v1/query", params={"query": "textserve_requests_total"}
                    ).json()
                    assert query["status"] == "success"
                    result = query["data"]["result"]
                    if result:
                        break
            except httpx.TransportError:
                pass  # not listening yet
            time.sleep(0.3)
    log = (tmp_path / "prometheus.log").read_text(errors="replace")[-3000:]
    assert health.get("textserve") == "up", f"targets {health}; prometheus log:\n{log}"
    assert result, f"no textserve_requests_total samples within 25 s; prometheus log:\n{log}"
    scraped = {tuple(sorted(r["metric"].items())) for r in result}
    assert any(dict(m).get("model") == "pos" and dict(m).get("status") == "200" for m in scraped)
    assert all(
        dict(m)["job"] == "textserve" and dict(m)["deployment"] == "compose" for m in scraped
    )
