"""Fuzzing the real server with schemathesis, from its own OpenAPI document.

Every operation of ``/openapi.json`` gets generated requests — schema-valid ones and
schema-violating ones — sent to the real uvicorn server (the session's ``live_server``, the
small repository plus a deliberately broken model). Every response must match the documented
status codes, content types and response schemas, and must not be a server error.

Configured, not "fixed" (each a design decision, checked precisely instead of dropped):

* **413 is a rejection.** A schema-violating request refused with 413 (too many texts, a text
  over ``max_text_chars``) is correctly rejected; schemathesis's default list of rejection
  statuses lacks 413.
* **The broken model's 503.** Model names are drawn from the repository's models (including
  ``broken``, FAILED by design), so generated requests reach real inference. Instead of the
  generic ``not_a_server_error`` check, :func:`no_server_error` allows exactly one 5xx: 503 with
  a JSON error and ``Retry-After`` for the FAILED model (or an unloaded version). Anything
  else >= 500 fails.
* **V2 shape vs data.** JSON Schema cannot say ``shape[0] == len(data)``; the server checks it
  (400). Schema-valid bodies get a consistent shape (:func:`consistent_v2_shape`), so
  ``positive_data_acceptance`` stays on for the V2 routes.
* **V2 readiness is 200 or 400.** A not-ready model's ``/ready`` answers 400 (the protocol's
  "4xx means false", Triton's status): accepted for those operations.
* **Admin routes are disabled on this server** (no admin token): 403 even without an
  ``Authorization`` header, where schemathesis expects 401 (that case is tested elsewhere).

Bounded: a fixed number of examples per operation (< 60 s in all on 2 cores).
"""

from __future__ import annotations

from typing import Any

import httpx
import schemathesis
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from schemathesis.core.parameters import ParameterLocation

from tests.server.conftest import BROKEN, LiveServer

MAX_EXAMPLES = 25
MODEL_NAMES = ["pos", "noun-topic", "verb-topic", "pos-small-batch", BROKEN, "nope"]
VERSIONS = ["1", "2", "3"]
REJECTION_STATUSES = [
    "400",
    "401",
    "403",
    "404",
    "405",
    "406",
    "409",
    "413",
    "415",
    "422",
    "428",
    "429",
    "5xx",
]


def consistent_v2_shape(body: Any) -> Any:
    """A schema-valid V2 infer body, made consistent where JSON Schema cannot say how:
    ``shape`` becomes ``[len(data)]`` or ``[len(data), 1]``, and a ``binary_data_size``
    parameter without binary data is dropped."""
    if not isinstance(body, dict) or not isinstance(body.get("inputs"), list):
        return body
    for tensor in body["inputs"]:
        if not isinstance(tensor, dict):
            continue
        params = tensor.get("parameters")
        if isinstance(params, dict):
            params.pop("binary_data_size", None)
        shape, data = tensor.get("shape"), tensor.get("data")
        if isinstance(shape, list) and isinstance(data, list) and 1 <= len(shape) <= 2:
            tensor["shape"] = [len(data), 1][: len(shape)]
    return body


def served_document() -> dict[str, Any]:
    """The OpenAPI document the session's ``live_server`` serves: built by the same app code
    with the same limits (schemathesis needs it at collection time, before any server runs;
    :func:`test_the_document_is_the_servers_own` checks it is byte-for-byte the served one)."""
    from server.api.app import create_app
    from server.settings import Settings

    return create_app(Settings(_env_file=None)).openapi()


DOCUMENT = served_document()
ACCEPTED = ["2xx", "3xx", "401", "403", "404", "409", "429", "5xx"]
CONFIG = schemathesis.Config.from_dict(
    {
        "generation": {"max-examples": MAX_EXAMPLES, "mode": "all"},
        "phases": {"stateful": {"enabled": False}},
        "checks": {
            "not_a_server_error": {"enabled": False},  # see no_server_error
            "negative_data_rejection": {"expected-statuses": REJECTION_STATUSES},
        },
        "operations": [
            {
                # V2 readiness: "a 4xx status code indicates false" (400, as Triton).
                "include-path-regex": "/ready$",
                "checks": {"positive_data_acceptance": {"expected-statuses": [*ACCEPTED, "400"]}},
            },
            {
                # The session server has no admin token: admin routes are disabled and answer
                # 403 whatever the Authorization header (401 for a missing token when one is
                # configured is tested in test_reliability_reload).
                "include-path-regex": "^/v2/repository/",
                "checks": {"missing_required_header": {"enabled": False}},
            },
        ],
    }
)
schema = schemathesis.openapi.from_dict(DOCUMENT, config=CONFIG)


@schema.hook
def flatmap_path_parameters(context: Any, path_parameters: dict[str, Any] | None) -> Any:
    """Real model names (and sometimes real versions), so requests reach inference."""
    if not path_parameters:
        return st.just(path_parameters)
    fixed: dict[str, Any] = {k: st.just(v) for k, v in path_parameters.items()}
    if "name" in path_parameters:
        fixed["name"] = st.sampled_from(MODEL_NAMES)
    if "version" in path_parameters:
        fixed["version"] = st.sampled_from(VERSIONS) | st.just(path_parameters["version"])
    return st.fixed_dictionaries(fixed)


@schema.hook
def map_case(context: Any, case: Any) -> Any:
    """Schema-valid V2 bodies get the shape their data has (see :func:`consistent_v2_shape`);
    schema-violating ones are left as generated."""
    if case.operation.path.endswith("/infer") and not (
        case.meta is not None and case.meta.is_negative_at(ParameterLocation.BODY)
    ):
        case.body = consistent_v2_shape(case.body)
    return case


def no_server_error(response: Any, case: Any) -> None:
    """No 5xx, except the documented 503 for a model that is not ready (the FAILED one)."""
    status = response.status_code
    if status < 500:
        return
    body = response.json()
    assert status == 503, (status, body)
    assert response.headers.get("retry-after") in (["1"], "1")  # schemathesis: lists
    assert set(body) >= {"error"}, body
    assert case.path_parameters.get("name") == BROKEN or "not ready" in body["error"], body


@schema.parametrize()
@settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    derandomize=True,
)
def test_api_conforms_to_its_openapi_document(case: Any, live_server: LiveServer) -> None:
    response = case.call(base_url=live_server.url, timeout=60)
    case.validate_response(response)
    no_server_error(response, case)


def test_the_document_is_the_servers_own(client: httpx.Client) -> None:
    assert client.get("/openapi.json").json() == DOCUMENT


def test_the_server_survived_the_fuzzing(client: httpx.Client) -> None:
    assert client.get("/v2/health/ready").status_code == 200
    assert client.post("/v1/models/pos:classify", json={"texts": ["to run"]}).status_code == 200
