"""Open Inference Protocol (KServe V2 / Triton) request parsing and response encoding.

Supports JSON tensors and Triton's ``binary_tensor_data`` extension (the default of
``tritonclient.http``): the body is a JSON header of ``Inference-Header-Content-Length`` bytes
followed by raw tensors; a BYTES tensor is a sequence of 4-byte little-endian lengths each
followed by that many bytes. Supports the ``classification`` extension: an output requested
with ``"parameters": {"classification": k}`` answers the top ``k`` classes of each text as
BYTES ``"score:index:label"`` strings (Triton's format), most probable first.

The model takes one input ``text`` (BYTES, shape ``[N]`` or ``[N, 1]``) and has one output
``probs`` (FP32, shape ``[N, num_labels]``).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from server.api.body import parse_json, require_object
from server.dataplane import DataPlane, as_int, top_indices
from server.errors import BadRequest
from server.runtime.base import ProbArray

INPUT_NAME = "text"
OUTPUT_NAME = "probs"
HEADER_LENGTH = "Inference-Header-Content-Length"

_U32 = struct.Struct("<I")


def serialize_bytes_tensor(items: list[bytes]) -> bytes:
    """Triton's binary BYTES layout: ``<u32 length><bytes>`` per element."""
    parts: list[bytes] = []
    for item in items:
        parts.append(_U32.pack(len(item)))
        parts.append(item)
    return b"".join(parts)


def deserialize_bytes_tensor(buf: bytes | memoryview, where: str) -> list[bytes]:
    view = memoryview(buf)
    out: list[bytes] = []
    pos, end = 0, len(view)
    while pos < end:
        if pos + 4 > end:
            raise BadRequest(f"{where}: truncated BYTES element length")
        (n,) = _U32.unpack_from(view, pos)
        pos += 4
        if pos + n > end:
            raise BadRequest(f"{where}: BYTES element longer than the tensor data")
        out.append(bytes(view[pos : pos + n]))
        pos += n
    return out


@dataclass(frozen=True)
class InferRequest:
    id: str | None
    texts: list[str]
    classification: int
    """0: FP32 probabilities; k > 0: the top k classes as BYTES strings."""
    binary_output: bool


def _bool_param(params: dict[str, Any], key: str, where: str) -> bool:
    value = params.get(key, False)
    if type(value) is not bool:
        raise BadRequest(f"{where}.{key} must be a boolean")
    return value


def _params(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if type(value) is not dict:
        raise BadRequest(f"'{where}' must be an object")
    return value


def _split(body: bytes, header_length: str | None) -> tuple[bytes | memoryview, memoryview]:
    if header_length is None:
        return body, memoryview(b"")
    text = header_length.strip()
    if not (text.isascii() and text.isdigit() and len(text) <= 18):  # not "²", not 10**5000
        raise BadRequest(f"{HEADER_LENGTH} must be a non-negative integer")
    n = int(text)
    if n == 0 or n > len(body):
        raise BadRequest(f"{HEADER_LENGTH} {n} does not fit a body of {len(body)} bytes")
    view = memoryview(body)
    return view[:n], view[n:]


def _texts(tensor: Any, binary: memoryview, plane: DataPlane) -> list[str]:
    where = "inputs[0]"
    if type(tensor) is not dict:
        raise BadRequest(f"{where} must be an object")
    name = tensor.get("name")
    if name != INPUT_NAME:
        raise BadRequest(f"unknown input {name!r}; the model takes one BYTES input {INPUT_NAME!r}")
    if tensor.get("datatype") != "BYTES":
        raise BadRequest(f"input {INPUT_NAME!r} has datatype BYTES, not {tensor.get('datatype')!r}")
    raw_shape = tensor.get("shape")
    shape = [as_int(d) for d in raw_shape] if type(raw_shape) is list else []
    if (
        not 1 <= len(shape) <= 2
        or any(d is None or d < 0 for d in shape)
        or (len(shape) == 2 and shape[1] != 1)
    ):
        raise BadRequest(f"input {INPUT_NAME!r} must have shape [N] or [N, 1], not {raw_shape!r}")
    params = _params(tensor.get("parameters"), f"{where}.parameters")
    items: list[Any]
    if "binary_data_size" in params:
        size = params["binary_data_size"]
        if type(size) is not int or size < 0 or size > len(binary):
            raise BadRequest(f"{where}.parameters.binary_data_size does not fit the binary data")
        raw = deserialize_bytes_tensor(binary[:size], where)
        items = []
        for i, b in enumerate(raw):
            try:
                items.append(b.decode("utf-8"))
            except UnicodeDecodeError:
                raise BadRequest(f"{where} element {i} is not valid UTF-8") from None
    else:
        data = tensor.get("data")
        if type(data) is not list:
            raise BadRequest(f"{where} needs 'data' (a list of strings) or binary tensor data")
        if data and type(data[0]) is list:  # row-major nested form [[t0], [t1], ...]
            flat: list[Any] = []
            for row in data:
                if type(row) is not list:
                    raise BadRequest(f"{where}.data must be a list of strings")
                flat.extend(row)
            data = flat
        items = data
    if shape[0] != len(items):
        raise BadRequest(f"input {INPUT_NAME!r} has shape {shape} but {len(items)} elements")
    return plane.check_texts(items, f"{where}.data")


def parse_infer(body: bytes, header_length: str | None, plane: DataPlane) -> InferRequest:
    head, binary = _split(body, header_length)
    obj = require_object(parse_json(head))
    request_id = obj.get("id")
    if request_id is not None and type(request_id) is not str:
        raise BadRequest("'id' must be a string")
    params = _params(obj.get("parameters"), "parameters")
    inputs = obj.get("inputs")
    if type(inputs) is not list or len(inputs) != 1:
        raise BadRequest(f"'inputs' must hold exactly one tensor, {INPUT_NAME!r}")
    texts = _texts(inputs[0], binary, plane)
    classification = 0
    binary_output = _bool_param(params, "binary_data_output", "parameters")
    outputs = obj.get("outputs")
    if outputs is not None:
        if type(outputs) is not list or len(outputs) > 1:
            raise BadRequest(f"'outputs' must be a list naming at most one output, {OUTPUT_NAME!r}")
        binary_output = False
        for i, out in enumerate(outputs):
            if type(out) is not dict or out.get("name") != OUTPUT_NAME:
                name = out.get("name") if type(out) is dict else out
                raise BadRequest(
                    f"unknown output {name!r}; the model has one output {OUTPUT_NAME!r}"
                )
            oparams = _params(out.get("parameters"), f"outputs[{i}].parameters")
            binary_output = _bool_param(oparams, "binary_data", f"outputs[{i}].parameters")
            if "classification" in oparams:
                classification = plane.check_top_k(
                    oparams["classification"], f"outputs[{i}].parameters.classification"
                )
    return InferRequest(request_id, texts, classification, binary_output)


def encode_infer_response(
    request: InferRequest,
    model: str,
    version: int,
    labels: tuple[str, ...],
    probs: ProbArray,
) -> tuple[bytes, dict[str, str]]:
    """(body, extra headers) of the infer answer; JSON, or JSON + binary tensor data."""
    n = probs.shape[0]
    output: dict[str, Any] = {"name": OUTPUT_NAME}
    payload: bytes | None = None
    if request.classification:
        k = min(request.classification, len(labels))
        idx = top_indices(probs, k)
        strings = [f"{probs[r, j]:f}:{j}:{labels[j]}" for r in range(n) for j in idx[r]]
        output.update(datatype="BYTES", shape=[n, k])
        if request.binary_output:
            payload = serialize_bytes_tensor([s.encode("utf-8") for s in strings])
        else:
            output["data"] = strings
    else:
        output.update(datatype="FP32", shape=[n, int(probs.shape[1])])
        if request.binary_output:
            payload = probs.astype("<f4", copy=False).tobytes()
        else:
            output["data"] = np.ascontiguousarray(probs).reshape(-1)
    if payload is not None:
        output["parameters"] = {"binary_data_size": len(payload)}
    answer: dict[str, Any] = {"model_name": model, "model_version": str(version)}
    if request.id is not None:
        answer["id"] = request.id
    answer["outputs"] = [output]
    head = orjson.dumps(answer, option=orjson.OPT_SERIALIZE_NUMPY)
    if payload is None:
        return head, {}
    return head + payload, {HEADER_LENGTH: str(len(head))}
