"""Property tests: the tokenizer and the request checks hold for any input hypothesis finds.

* Tokenizer (``server/text.py``): never raises on any ``str``; ids are int32 within the
  vocabulary; encoding truncates at ``max_len`` (or ``fixed_len``); ``pad`` gives one row per
  text, a width clamped to ``min_len..max_len`` (or exactly ``fixed_len``), each row the text's
  ids followed only by padding; a text's row does not depend on the other texts in its batch.
* Request checks (``server/api/schemas.py``, ``server/api/v2_codec.py``): any JSON value is
  either accepted or refused with a 4xx :class:`~server.errors.TextserveError`, never another
  exception; every request valid by the documented request models is accepted, with its texts
  in order.
"""

from __future__ import annotations

import base64
import re
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from server.api.schemas import (
    ClassifyRequest,
    MultiClassifyRequest,
    PredictRequest,
    V2InferRequest,
    parse_classify,
    parse_multi_classify,
    parse_predict,
)
from server.api.v2_codec import parse_infer, serialize_bytes_tensor
from server.artifact import OOV_ID, PAD_ID, TokenizerSpec
from server.dataplane import DataPlane
from server.errors import TextserveError
from server.registry import Registry
from server.settings import Settings
from server.text import Tokenizer, Vocabulary, tokenize

WORDS = ["the", "cat", "sat", "on", "mat", ".", "don't", "café", "u.s.", "naïve", "日本", "-"]
VOCAB = Vocabulary.from_words(WORDS)

specs = st.builds(
    TokenizerSpec,
    lowercase=st.booleans(),
    max_len=st.integers(1, 40),
    min_len=st.integers(1, 8),
    fixed_len=st.none() | st.integers(1, 30),
)
# Text that mixes vocabulary words, unknown words, punctuation, whitespace and any unicode.
texts = st.lists(
    st.sampled_from([*WORDS, "The", "CAT", "zebra", "!", " ", "\n", "\t", "\x00", "😀"])
    | st.text(max_size=12),
    max_size=60,
).map(" ".join) | st.text(max_size=400)


@given(text=texts, lowercase=st.booleans())
def test_tokenize_never_raises_and_keeps_no_whitespace(text: str, lowercase: bool) -> None:
    tokens = tokenize(text, lowercase)
    assert all(t and not any(c.isspace() for c in t) for t in tokens)
    if lowercase:
        assert tokens == tokenize(text.lower(), lowercase)


@given(text=texts, spec=specs)
def test_encode_is_truncated_int_ids_in_the_vocabulary(text: str, spec: TokenizerSpec) -> None:
    ids = Tokenizer(VOCAB, spec).encode(text)
    limit = spec.fixed_len or spec.max_len
    assert len(ids) <= limit
    assert all(type(i) is int and OOV_ID <= i < len(VOCAB) for i in ids)
    full = Tokenizer(VOCAB, TokenizerSpec(max_len=10_000)).encode(text)
    if spec.lowercase:
        assert ids == full[:limit]  # truncation keeps the first tokens


@given(batch=st.lists(texts, min_size=1, max_size=8), spec=specs)
def test_pad_invariants(batch: list[str], spec: TokenizerSpec) -> None:
    tokenizer = Tokenizer(VOCAB, spec)
    encoded = [tokenizer.encode(t) for t in batch]
    padded = tokenizer.pad(encoded)
    assert padded.dtype == np.int32
    assert padded.flags.c_contiguous
    longest = max(len(e) for e in encoded)
    if spec.fixed_len is not None:
        width = spec.fixed_len
    else:
        width = min(max(longest, spec.min_len), max(spec.max_len, spec.min_len))
    assert padded.shape == (len(batch), width)
    for row, ids in zip(padded, encoded, strict=True):
        n = min(len(ids), width)
        assert row[:n].tolist() == ids[:n]
        assert (row[n:] == PAD_ID).all()
        assert (row[:n] != PAD_ID).all()
    # A text's row does not depend on its neighbours (beyond the shared width).
    alone = tokenizer.pad([encoded[0]])
    assert padded[0, : alone.shape[1]].tolist() == alone[0, : padded.shape[1]].tolist()
    assert np.array_equal(tokenizer.encode_batch(batch), padded)


def test_pad_of_an_empty_text_is_all_padding() -> None:
    padded = Tokenizer(VOCAB, TokenizerSpec(min_len=3)).pad([[]])
    assert padded.tolist() == [[PAD_ID] * 3]


# -- request checks -------------------------------------------------------------------------

LIMITS = Settings(_env_file=None, max_texts_per_request=16, max_text_chars=64, max_top_k=10)


@pytest.fixture(scope="module")
def plane(tmp_path_factory: pytest.TempPathFactory) -> DataPlane:
    cfg = LIMITS.model_copy(update={"repo": Path(tmp_path_factory.mktemp("empty"))})
    return DataPlane(Registry(cfg), cfg)


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=80),
    lambda inner: st.lists(inner, max_size=20) | st.dictionaries(st.text(max_size=12), inner),
    max_leaves=40,
)
fields = st.sampled_from(
    ["texts", "top_k", "models", "instances", "inputs", "signature_name", "b64", "text"]
)
request_like = st.dictionaries(fields | st.text(max_size=8), json_values, max_size=4)
in_limit_texts = st.lists(st.text(max_size=LIMITS.max_text_chars), min_size=1, max_size=16)


def _refused_or_accepted(call: Any) -> Any:
    """``call()``'s result, or None when it raised a 4xx TextserveError with a message."""
    error: TextserveError | None = None
    try:
        return call()
    except TextserveError as exc:
        error = exc
    assert 400 <= int(error.status) < 500, error
    assert error.message
    return None


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=request_like | json_values)
def test_any_json_is_accepted_or_a_4xx(plane: DataPlane, body: Any) -> None:
    if type(body) is dict:
        _refused_or_accepted(lambda: parse_classify(body, plane))
        _refused_or_accepted(lambda: parse_multi_classify(body, plane))
        _refused_or_accepted(lambda: parse_predict(body, plane))
    raw = orjson.dumps(body)
    _refused_or_accepted(lambda: parse_infer(raw, None, plane))


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=300), header=st.none() | st.text(max_size=6))
def test_any_v2_bytes_are_accepted_or_a_4xx(
    plane: DataPlane, data: bytes, header: str | None
) -> None:
    _refused_or_accepted(lambda: parse_infer(data, header, plane))


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(batch=in_limit_texts, top_k=st.none() | st.integers(1, LIMITS.max_top_k))
def test_valid_native_requests_are_accepted(
    plane: DataPlane, batch: list[str], top_k: int | None
) -> None:
    body: dict[str, Any] = {"texts": batch} if top_k is None else {"texts": batch, "top_k": top_k}
    ClassifyRequest.model_validate_json(orjson.dumps(body))
    assert parse_classify(body, plane) == (batch, top_k or 1)
    multi = {**body, "models": ["a", "b"]}
    MultiClassifyRequest.model_validate_json(orjson.dumps(multi))
    assert parse_multi_classify(multi, plane) == (batch, ["a", "b"], top_k or 1)


def _tfs_item(text: str, form: int) -> Any:
    if form == 1:
        return {"b64": base64.b64encode(text.encode("utf-8")).decode("ascii")}
    if form == 2:
        return {"text": text}
    return text


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    batch=in_limit_texts,
    forms=st.lists(st.integers(0, 2), min_size=16, max_size=16),
    layout=st.sampled_from(["instances", "inputs", "inputs.text"]),
)
def test_valid_tf_serving_requests_are_accepted(
    plane: DataPlane, batch: list[str], forms: list[int], layout: str
) -> None:
    if layout == "instances":
        body: dict[str, Any] = {
            "instances": [_tfs_item(t, f) for t, f in zip(batch, forms, strict=False)]
        }
    else:
        items = [
            _tfs_item(t, f % 2) for t, f in zip(batch, forms, strict=False)
        ]  # no {"text": ...} here
        body = {"inputs": items if layout == "inputs" else {"text": items}}
    PredictRequest.model_validate_json(orjson.dumps(body))
    assert parse_predict(body, plane) == (batch, layout != "instances")


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    batch=in_limit_texts,
    nested=st.booleans(),
    binary=st.booleans(),
    classification=st.none() | st.integers(1, LIMITS.max_top_k),
    request_id=st.none() | st.text(max_size=10),
)
def test_valid_v2_requests_are_accepted(
    plane: DataPlane,
    batch: list[str],
    nested: bool,
    binary: bool,
    classification: int | None,
    request_id: str | None,
) -> None:
    shape = [len(batch), 1] if nested else [len(batch)]
    tensor: dict[str, Any] = {"name": "text", "datatype": "BYTES", "shape": shape}
    payload = b""
    if binary:
        payload = serialize_bytes_tensor([t.encode("utf-8") for t in batch])
        tensor["parameters"] = {"binary_data_size": len(payload)}
    else:
        tensor["data"] = [[t] for t in batch] if nested else batch
    body: dict[str, Any] = {"inputs": [tensor]}
    if request_id is not None:
        body["id"] = request_id
    if classification is not None:
        body["outputs"] = [{"name": "probs", "parameters": {"classification": classification}}]
    head = orjson.dumps(body)
    if not binary:
        V2InferRequest.model_validate_json(head)
    infer = parse_infer(head + payload, str(len(head)) if binary else None, plane)
    assert infer.texts == batch
    assert infer.id == request_id
    assert infer.classification == (classification or 0)


_UNICODE_RULE = re.compile(r"\w+(?:['\-.]\w+)*|[^\w\s]")
"""The tokenizer's rule with Unicode classes and no fast path (what ``tokenize`` must equal)."""


@given(st.text(alphabet=st.characters(max_codepoint=127), max_size=80))
@settings(max_examples=2000, deadline=None)
def test_the_ascii_fast_path_splits_like_the_unicode_rule(text: str) -> None:
    assert tokenize(text, lowercase=False) == _UNICODE_RULE.findall(text)
