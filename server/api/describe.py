"""JSON descriptions of models for the three protocols (status and metadata routes).

``GET /v1/models/{name}`` is both textserve's model description and TensorFlow Serving's
model status route. It answers a superset: TF Serving's ``model_version_status`` list (what TF
Serving clients read) next to textserve's fields (``name``, ``state``, ``versions``, ...).
TF Serving states: LOADING → ``LOADING``, READY → ``AVAILABLE``, UNLOADING → ``UNLOADING``,
FAILED → ``END`` with ``error_code`` ``UNKNOWN`` and the reason as ``error_message``.
"""

from __future__ import annotations

from typing import Any

from server import __version__
from server.api.v2_codec import INPUT_NAME, OUTPUT_NAME
from server.registry import ModelEntry, ModelVersion, Registry, VersionState

V2_EXTENSIONS = ("classification", "binary_tensor_data")
V2_PLATFORM = "tensorflow_graphdef"

_TFS_STATE = {
    VersionState.LOADING: "LOADING",
    VersionState.READY: "AVAILABLE",
    VersionState.FAILED: "END",
    VersionState.UNLOADING: "UNLOADING",
}


def version_info(mv: ModelVersion) -> dict[str, Any]:
    stats = mv.stats
    manifest = mv.manifest
    return {
        "version": str(mv.version),
        "state": str(mv.state),
        "reason": mv.reason,
        "path": str(mv.path),
        "format": str(manifest.format) if manifest is not None else None,
        "labels": list(mv.labels),
        "embedding": mv.embedding,
        "load_seconds": round(stats.load_seconds, 4) if stats else None,
        "warmup_seconds": round(stats.warmup_seconds, 4) if stats else None,
        "memory": {
            "rss_before": stats.memory_before.rss,
            "rss_after": stats.memory_after.rss,
            "uss_before": stats.memory_before.uss,
            "uss_after": stats.memory_after.uss,
        }
        if stats
        else None,
        "batching": {
            "max_batch_size": mv.batching.max_batch_size,
            "max_wait_ms": mv.batching.max_wait_ms,
            "max_queue": mv.batching.max_queue,
            "max_in_flight": mv.batching.max_in_flight,
        },
    }


def model_info(registry: Registry, entry: ModelEntry) -> dict[str, Any]:
    versions = registry.versions(entry.name)
    serving = next((v for v in reversed(versions) if v.state is VersionState.READY), None)
    shown = serving or (versions[-1] if versions else None)
    return {
        "name": entry.name,
        "state": str(entry.state),
        "reason": entry.state_reason,
        "default_version": str(serving.version) if serving else None,
        "labels": list(shown.labels) if shown else [],
        "format": str(shown.manifest.format) if shown and shown.manifest else None,
        "embedding": shown.embedding if shown else None,
        "versions": [version_info(v) for v in versions],
    }


def model_list(registry: Registry) -> dict[str, Any]:
    return {"models": [model_info(registry, e) for e in registry.entries()]}


def tfs_version_status(mv: ModelVersion) -> dict[str, Any]:
    failed = mv.state is VersionState.FAILED
    return {
        "version": str(mv.version),
        "state": _TFS_STATE[mv.state],
        "status": {"error_code": "UNKNOWN" if failed else "OK", "error_message": mv.reason},
    }


def model_status(registry: Registry, name: str) -> dict[str, Any]:
    """TF Serving's status plus textserve's description (``GET /v1/models/{name}``)."""
    info = model_info(registry, registry.entry(name))
    info["model_version_status"] = [
        tfs_version_status(v) for v in reversed(registry.versions(name))
    ]
    return info


def tfs_metadata(mv: ModelVersion) -> dict[str, Any]:
    """TF Serving's ``GET /v1/models/{name}[/versions/{v}]/metadata``."""

    def tensor(name: str, dtype: str, dims: list[int]) -> dict[str, Any]:
        return {
            "dtype": dtype,
            "tensor_shape": {
                "dim": [{"size": str(d), "name": ""} for d in dims],
                "unknown_rank": False,
            },
            "name": f"{name}:0",
        }

    signature = {
        "inputs": {INPUT_NAME: tensor(INPUT_NAME, "DT_STRING", [-1])},
        "outputs": {OUTPUT_NAME: tensor(OUTPUT_NAME, "DT_FLOAT", [-1, len(mv.labels)])},
        "method_name": "tensorflow/serving/predict",
    }
    return {
        "model_spec": {"name": mv.name, "signature_name": "", "version": str(mv.version)},
        "metadata": {"signature_def": {"signature_def": {"serving_default": signature}}},
    }


def v2_server_metadata() -> dict[str, Any]:
    return {"name": "textserve", "version": __version__, "extensions": list(V2_EXTENSIONS)}


def v2_model_metadata(registry: Registry, mv: ModelVersion) -> dict[str, Any]:
    ready = [str(v.version) for v in registry.versions(mv.name) if v.state is VersionState.READY]
    return {
        "name": mv.name,
        "versions": ready,
        "platform": V2_PLATFORM,
        "inputs": [{"name": INPUT_NAME, "datatype": "BYTES", "shape": [-1]}],
        "outputs": [{"name": OUTPUT_NAME, "datatype": "FP32", "shape": [-1, len(mv.labels)]}],
    }
