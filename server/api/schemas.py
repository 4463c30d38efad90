"""Request/response schemas of the three protocols, and the cheap hand checks of request bodies.

The pydantic models document the API (OpenAPI, used by the schemathesis fuzz test); the hot
routes do not run them: they parse with orjson and check with the ``parse_*`` functions here,
which raise :class:`~server.errors.BadRequest` (400) / ``PayloadTooLarge`` (413) with a message
naming the offending field.
"""

from __future__ import annotations

import base64
import binascii
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.json_schema import SkipJsonSchema

from server.dataplane import DataPlane
from server.errors import BadRequest
from server.settings import Settings

# ---------------------------------------------------------------------------------------------
# Common


class ErrorResponse(BaseModel):
    error: str = Field(description="What went wrong, in one line.")


# ---------------------------------------------------------------------------------------------
# Native


class ClassifyRequest(BaseModel):
    """Classify texts with one model."""

    model_config = ConfigDict(extra="forbid")

    texts: list[str] = Field(
        min_length=1,
        description="Texts to classify; one result per text, in order. An empty or "
        "whitespace-only text is classified (the model sees only padding).",
        examples=[["a small domesticated carnivorous mammal"]],
    )
    top_k: int = Field(default=1, ge=1, description="How many labels to rank per text.")


class MultiClassifyRequest(BaseModel):
    """Classify every text with every model."""

    model_config = ConfigDict(extra="forbid")

    texts: list[str] = Field(min_length=1, description="Texts to classify.")
    models: list[str] | None = Field(
        default=None,
        min_length=1,
        description="Model names; omitted or null: every model with a READY version.",
    )
    top_k: int = Field(default=1, ge=1, description="How many labels to rank per text.")


class LabelScore(BaseModel):
    label: str
    score: float


class TextResult(BaseModel):
    label: str = Field(description="The most probable label.")
    score: float = Field(description="Its probability.")
    top_k: list[LabelScore] = Field(description="The top_k labels, most probable first.")


class ClassifyResponse(BaseModel):
    model: str
    version: str
    results: list[TextResult]


class ModelResults(BaseModel):
    version: str
    results: list[TextResult]


class MultiClassifyResponse(BaseModel):
    models: list[str] = Field(description="The models that answered, in order.")
    results: dict[str, ModelResults] = Field(description="Model name → its results.")


class MemoryFigures(BaseModel):
    rss_before: int
    rss_after: int
    uss_before: int
    uss_after: int


class BatchingInfo(BaseModel):
    max_batch_size: int
    max_wait_ms: float
    max_queue: int
    max_in_flight: int


class VersionInfo(BaseModel):
    version: str
    state: str = Field(description="LOADING, READY, FAILED or UNLOADING.")
    reason: str = Field(description="Why the version FAILED (empty otherwise).")
    path: str
    format: str | None
    labels: list[str]
    embedding: str | None
    load_seconds: float | None
    warmup_seconds: float | None
    memory: MemoryFigures | None = Field(description="Process memory around load + warm-up.")
    batching: BatchingInfo


class TfsStatus(BaseModel):
    error_code: str
    error_message: str


class TfsVersionStatus(BaseModel):
    version: str
    state: str
    status: TfsStatus


class ModelInfo(BaseModel):
    name: str
    state: str = Field(description="LOADING, READY, FAILED, UNLOADING or UNAVAILABLE.")
    reason: str
    default_version: str | None = Field(description="The version serving unversioned routes.")
    labels: list[str]
    format: str | None
    embedding: str | None
    versions: list[VersionInfo]


class ModelStatusResponse(ModelInfo):
    """TensorFlow Serving's model status plus textserve's model description."""

    model_version_status: list[TfsVersionStatus]


class ModelListResponse(BaseModel):
    models: list[ModelInfo]


# ---------------------------------------------------------------------------------------------
# TensorFlow Serving REST


BASE64_PATTERN = r"^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?$"


class Base64Text(BaseModel):
    model_config = ConfigDict(extra="forbid")

    b64: str = Field(
        pattern=BASE64_PATTERN,
        description="Base64 of the text's UTF-8 bytes (invalid UTF-8 is replaced by U+FFFD).",
    )


class NamedInstance(BaseModel):
    model_config = ConfigDict(extra="forbid")

    text: str | Base64Text


TextList = Annotated[list[str | Base64Text], Field(min_length=1)]


class PredictRequest(BaseModel):
    """TF Serving's predict request: row (``instances``) or columnar (``inputs``) format."""

    model_config = ConfigDict(
        json_schema_extra={"oneOf": [{"required": ["instances"]}, {"required": ["inputs"]}]}
    )

    signature_name: str | SkipJsonSchema[None] = Field(
        default=None, description="Accepted and ignored: the model has one signature."
    )
    instances: (
        Annotated[list[str | Base64Text | NamedInstance], Field(min_length=1)]
        | SkipJsonSchema[None]
    ) = Field(default=None, description="Row format; answered as 'predictions'.")
    inputs: (
        TextList
        | Annotated[dict[str, TextList], Field(min_length=1, max_length=1)]
        | SkipJsonSchema[None]
    ) = Field(default=None, description="Columnar format; answered as 'outputs'.")


class PredictResponse(BaseModel):
    predictions: list[list[float]] | None = None
    outputs: list[list[float]] | None = None


class TfsStatusResponse(BaseModel):
    model_version_status: list[TfsVersionStatus]


class TfsMetadataResponse(BaseModel):
    model_spec: dict[str, Any]
    metadata: dict[str, Any]


# ---------------------------------------------------------------------------------------------
# Open Inference Protocol (KServe V2)


class V2InputTensor(BaseModel):
    name: Literal["text"]
    shape: list[Annotated[int, Field(ge=0)]] = Field(
        min_length=1, max_length=2, description="[N] or [N, 1]; N = the number of texts."
    )
    datatype: Literal["BYTES"]
    parameters: dict[str, Any] | SkipJsonSchema[None] = Field(
        default=None,
        description="'binary_data_size' when the texts follow the JSON header as binary data.",
    )
    data: (
        Annotated[list[str], Field(min_length=1)]
        | Annotated[
            list[Annotated[list[str], Field(min_length=1, max_length=1)]], Field(min_length=1)
        ]
    ) = Field(description="The texts; row-major nested lists are accepted too.")


class V2OutputParameters(BaseModel):
    classification: Annotated[int, Field(ge=1)] | SkipJsonSchema[None] = Field(
        default=None, description="Answer the top k classes as 'score:index:label'."
    )
    binary_data: bool = Field(default=False, description="Answer as binary tensor data.")


class V2RequestedOutput(BaseModel):
    name: Literal["probs"]
    parameters: V2OutputParameters | SkipJsonSchema[None] = None


class V2RequestParameters(BaseModel):
    binary_data_output: bool = Field(
        default=False, description="Answer outputs as binary tensor data (no 'outputs' given)."
    )


class V2InferRequest(BaseModel):
    id: str | SkipJsonSchema[None] = None
    parameters: V2RequestParameters | SkipJsonSchema[None] = None
    inputs: list[V2InputTensor] = Field(min_length=1, max_length=1)
    outputs: Annotated[list[V2RequestedOutput], Field(max_length=1)] | SkipJsonSchema[None] = None


class V2OutputTensor(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, Any] | None = None
    data: list[Any] | None = None


class V2InferResponse(BaseModel):
    model_name: str
    model_version: str
    id: str | None = None
    outputs: list[V2OutputTensor]


class V2TensorMetadata(BaseModel):
    name: str
    datatype: str
    shape: list[int]


class V2ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[V2TensorMetadata]
    outputs: list[V2TensorMetadata]


class V2ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class V2Live(BaseModel):
    live: bool


class V2Ready(BaseModel):
    ready: bool


class V2ModelReady(BaseModel):
    name: str
    ready: bool


REQUEST_MODELS: tuple[type[BaseModel], ...] = (
    ClassifyRequest,
    MultiClassifyRequest,
    PredictRequest,
    V2InferRequest,
)
"""Request schemas referenced from the OpenAPI document by ``request_body``."""


def request_body(model: type[BaseModel], *media_types: str) -> dict[str, Any]:
    """``openapi_extra`` declaring ``model`` as the JSON request body of a raw-body route."""
    ref = {"$ref": f"#/components/schemas/{model.__name__}"}
    content = {m: {"schema": ref} for m in ("application/json", *media_types)}
    return {"requestBody": {"required": True, "content": content}}


def openapi_components(limits: Settings) -> dict[str, Any]:
    """JSON schemas of :data:`REQUEST_MODELS` (and their nested models) for components, with
    the server's limits (texts per request, characters per text, top_k) written in."""
    out: dict[str, Any] = {}
    for model in REQUEST_MODELS:
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        out.update(schema.pop("$defs", {}))
        out[model.__name__] = schema
    _apply_limits(out, limits)
    return out


def _cap_texts(node: Any, max_items: int, max_chars: int) -> None:
    """Every array → maxItems, every string → maxLength, inside ``node`` (no $ref following)."""
    if isinstance(node, dict):
        if node.get("type") == "array" and "maxItems" not in node:
            node["maxItems"] = max_items
        if node.get("type") == "string" and "pattern" not in node:
            node["maxLength"] = max_chars
        for value in node.values():
            _cap_texts(value, max_items, max_chars)
    elif isinstance(node, list):
        for value in node:
            _cap_texts(value, max_items, max_chars)


def _apply_limits(schemas: dict[str, Any], limits: Settings) -> None:
    n, chars, top_k = limits.max_texts_per_request, limits.max_text_chars, limits.max_top_k
    for name in ("ClassifyRequest", "MultiClassifyRequest"):
        props = schemas[name]["properties"]
        _cap_texts(props["texts"], n, chars)
        props["top_k"]["maximum"] = top_k
    props = schemas["PredictRequest"]["properties"]
    _cap_texts(props["instances"], n, chars)
    _cap_texts(props["inputs"], n, chars)
    schemas["NamedInstance"]["properties"]["text"]["anyOf"][0]["maxLength"] = chars
    schemas["Base64Text"]["properties"]["b64"]["maxLength"] = 4 * -(-chars // 3)
    _cap_texts(schemas["V2InputTensor"]["properties"]["data"], n, chars)
    schemas["V2InputTensor"]["properties"]["shape"]["maxItems"] = 2
    schemas["V2InputTensor"]["properties"]["shape"]["items"]["maximum"] = n
    schemas["V2OutputParameters"]["properties"]["classification"]["maximum"] = top_k


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorResponse, "description": "Malformed request or bad field."},
    404: {"model": ErrorResponse, "description": "Unknown model or version."},
    413: {"model": ErrorResponse, "description": "Too many texts, text or body too long."},
    415: {"model": ErrorResponse, "description": "Not a JSON body."},
    503: {"model": ErrorResponse, "description": "Model not ready, or queue full."},
}
"""Documented error answers of the inference routes (all ``{"error": "..."}``)."""

V2_INFER_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "The inference response: JSON, or with Triton's binary tensor data "
        "extension (``binary_data_output``/``binary_data``) a JSON header of "
        "``Inference-Header-Content-Length`` bytes followed by the raw tensor.",
        "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
    },
    **ERROR_RESPONSES,
}
"""The V2 infer routes also answer ``application/octet-stream`` (binary tensor data)."""


# ---------------------------------------------------------------------------------------------
# Hand checks (hot path)


def _no_unknown(obj: dict[str, Any], allowed: frozenset[str]) -> None:
    if not allowed.issuperset(obj):
        unknown = sorted(set(obj) - allowed)
        raise BadRequest(f"unknown field {unknown[0]!r} (allowed: {', '.join(sorted(allowed))})")


_CLASSIFY_FIELDS = frozenset({"texts", "top_k"})
_MULTI_FIELDS = frozenset({"texts", "models", "top_k"})


def parse_classify(obj: dict[str, Any], plane: DataPlane) -> tuple[list[str], int]:
    """``{"texts": [...], "top_k": 1}`` → (texts, top_k)."""
    _no_unknown(obj, _CLASSIFY_FIELDS)
    if "texts" not in obj:
        raise BadRequest("missing field 'texts'")
    texts = plane.check_texts(obj["texts"])
    top_k = plane.check_top_k(obj["top_k"]) if "top_k" in obj else 1
    return texts, top_k


def parse_multi_classify(
    obj: dict[str, Any], plane: DataPlane
) -> tuple[list[str], list[str] | None, int]:
    """``{"texts": [...], "models": [...], "top_k": 1}`` → (texts, models or None, top_k)."""
    _no_unknown(obj, _MULTI_FIELDS)
    if "texts" not in obj:
        raise BadRequest("missing field 'texts'")
    texts = plane.check_texts(obj["texts"])
    models = obj.get("models")
    if models is not None:
        if type(models) is not list or not models:
            raise BadRequest("'models' must be a non-empty list of model names")
        for i, m in enumerate(models):
            if type(m) is not str:
                raise BadRequest(f"models[{i}] must be a string")
    top_k = plane.check_top_k(obj["top_k"]) if "top_k" in obj else 1
    return texts, models, top_k


def _text_value(item: Any, where: str) -> Any:
    """A TF Serving string value: a str, or ``{"b64": ...}`` (decoded to str)."""
    if type(item) is dict and len(item) == 1 and "b64" in item:
        encoded = item["b64"]
        if type(encoded) is not str:
            raise BadRequest(f"{where}: 'b64' must be a string")
        try:
            raw = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError):
            raise BadRequest(f"{where}: 'b64' is not valid base64") from None
        return raw.decode("utf-8", errors="replace")
    return item


def parse_predict(obj: dict[str, Any], plane: DataPlane) -> tuple[list[str], bool]:
    """TF Serving predict body → (texts, columnar). Row: ``{"instances": [...]}``, items a
    string, ``{"b64": ...}`` or ``{"text": ...}``; columnar: ``{"inputs": [...]}`` or
    ``{"inputs": {"text": [...]}}``."""
    if "instances" in obj and "inputs" in obj:
        raise BadRequest("send either 'instances' or 'inputs', not both")
    signature = obj.get("signature_name")
    if signature is not None and type(signature) is not str:
        raise BadRequest("'signature_name' must be a string")
    if "instances" in obj:
        items, field, columnar = obj["instances"], "instances", False
    elif "inputs" in obj:
        items, field, columnar = obj["inputs"], "inputs", True
        if type(items) is dict:
            if len(items) != 1:
                raise BadRequest("'inputs' must name exactly one input, 'text'")
            ((key, items),) = items.items()
            field = f"inputs.{key}"
    else:
        raise BadRequest("missing field 'instances' (or 'inputs')")
    if type(items) is list:
        texts: list[Any] = items
        if any(type(t) is not str for t in items):
            texts = []
            for i, item in enumerate(items):
                where = f"{field}[{i}]"
                if not columnar and type(item) is dict and "b64" not in item:
                    if set(item) != {"text"}:
                        raise BadRequest(f"{where}: named instances take one input, 'text'")
                    item = item["text"]
                texts.append(_text_value(item, where))
        items = texts
    return plane.check_texts(items, field), columnar


def parse_positive_int(value: Any, where: str) -> int:
    if type(value) is not int or value < 1:
        raise BadRequest(f"{where} must be a positive integer")
    return value
