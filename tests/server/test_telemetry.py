"""FastAPI's native OpenTelemetry instrumentation: off by default, on with the setting.

A real OpenTelemetry SDK tracer provider with an in-memory exporter is installed for the
process (once: OpenTelemetry allows one global provider); two real servers answer the same
request, and only the one with ``TEXTSERVE_OPENTELEMETRY`` set produces a server span.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from server.settings import Settings
from tests.server.conftest import run_server


@pytest.fixture(scope="module")
def exporter() -> InMemorySpanExporter:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    return exporter


def test_requests_are_traced_only_when_opentelemetry_is_on(
    exporter: InMemorySpanExporter, served_repo: Path
) -> None:
    for enabled in (False, True):
        exporter.clear()
        settings = Settings(_env_file=None, repo=served_repo, opentelemetry=enabled)
        with run_server(settings, wait_loaded=False) as server:
            assert httpx.get(f"{server.url}/v1/models", timeout=30).status_code == 200
        spans = [s for s in exporter.get_finished_spans() if s.kind is trace.SpanKind.SERVER]
        assert bool(spans) is enabled
        if enabled:
            assert spans[0].attributes is not None
            assert spans[0].attributes.get("http.response.status_code") == 200


def test_the_setting_reads_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings(_env_file=None).opentelemetry is False
    monkeypatch.setenv("TEXTSERVE_OPENTELEMETRY", "true")
    assert Settings(_env_file=None).opentelemetry is True
