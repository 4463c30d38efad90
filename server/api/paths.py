"""Route path parameters.

Model names cannot contain ``/`` or ``:`` (``models.yaml`` allows ``[A-Za-z0-9_.-]``), so the
``{name:model}`` parameter matches ``[^/:]+``. That keeps ``GET /v1/models/{name}`` from matching
``/v1/models/pos:classify``: a wrong method on an action route answers 405 with ``Allow: POST``
instead of "no model 'pos:classify'".
"""

from __future__ import annotations

from starlette.convertors import Convertor, register_url_convertor


class ModelNameConvertor(Convertor[str]):
    regex = "[^/:]+"

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


register_url_convertor("model", ModelNameConvertor())

MODEL = "/v1/models/{name:model}"
"""Prefix of the v1 per-model routes."""
MODEL_VERSION = "/v1/models/{name:model}/versions/{version}"
V2_MODEL = "/v2/models/{name:model}"
V2_MODEL_VERSION = "/v2/models/{name:model}/versions/{version}"
V2_REPOSITORY_MODEL = "/v2/repository/models/{name:model}"
"""Prefix of the admin load/unload routes (Triton's model repository extension)."""
