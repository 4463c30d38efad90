"""The server a user would write in an afternoon: the benchmark's baseline.

FastAPI + a pydantic request and response model, a plain ``def`` handler (FastAPI runs it in
its thread pool) that tokenizes and calls the model once per request: no batching across
requests, no queue bound, default JSON encoding. It loads the same model version with
textserve's own runtime, so the model's compute is identical and only the serving differs.
Same route and body as textserve: ``POST /v1/models/{name}:classify {"texts": [...]}``.

    python -m bench.naive_server --version-dir REPO/m/1 --embedding-dir REPO/embeddings/e
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from fastapi import FastAPI, HTTPException
from pydantic import BaseModel

from server.embeddings import EmbeddingStore
from server.runtime.base import Runtime
from server.runtime.loader import load_runtime


class ClassifyRequest(BaseModel):
    texts: list[str]
    top_k: int = 1


class LabelScore(BaseModel):
    label: str
    score: float


class TextResult(BaseModel):
    label: str
    score: float
    top_k: list[LabelScore]


class ClassifyResponse(BaseModel):
    model: str
    version: str
    results: list[TextResult]


def create_app(runtime: Runtime) -> FastAPI:
    app = FastAPI()
    manifest = runtime.manifest
    labels = runtime.labels

    @app.post("/v1/models/{name}:classify", response_model=ClassifyResponse)
    def classify(name: str, request: ClassifyRequest) -> ClassifyResponse:
        if name != manifest.name:
            raise HTTPException(status_code=404, detail=f"no model {name}")
        if not request.texts:
            raise HTTPException(status_code=400, detail="no texts")
        probs = runtime.predict(runtime.tokenizer.encode_batch(request.texts))
        results = []
        for row in probs:
            best = np.argsort(-row)[: request.top_k]
            ranked = [LabelScore(label=labels[i], score=float(row[i])) for i in best]
            results.append(TextResult(label=ranked[0].label, score=ranked[0].score, top_k=ranked))
        return ClassifyResponse(model=manifest.name, version=str(manifest.version), results=results)

    return app


def main() -> None:
    import uvicorn

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--version-dir", type=Path, required=True)
    parser.add_argument("--embedding-dir", type=Path, default=None)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--intra-op-threads", type=int, default=2)
    args = parser.parse_args()
    runtime = load_runtime(
        args.version_dir,
        store=EmbeddingStore(),
        embedding_dir=args.embedding_dir,
        intra_op_threads=args.intra_op_threads,
        inter_op_threads=1,
    )
    uvicorn.run(create_app(runtime), host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
