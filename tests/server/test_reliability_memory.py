"""Memory comes back after an unload: measured on a real ``textserve serve`` process.

A repository with one model reading a large embedding (120k x 256 float32, 117 MiB). The
server's RSS is sampled loaded, after an admin unload, after loading again and after a second
unload: the unload gives the embedding's memory back (it is a read-only memory map released
with its last user), and load/unload cycles do not ratchet RSS up.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from server.artifact import CnnSpec, ModelFormat
from tests.serve_process import ServeProcess, serving
from tests.server.tf_models import embedding_ref, write_embedding, write_manifest

ROWS, DIM = 120_000, 256
TOKEN = "memory-test-token"
AUTH = {"authorization": f"Bearer {TOKEN}"}
MiB = 2**20


def build_repo(root: Path) -> Path:
    import tensorflow as tf

    from server.graph import build_cnn

    repo = root / "repo"
    rng = np.random.default_rng(0)
    matrix = rng.standard_normal((ROWS, DIM), dtype=np.float32)
    emb_dir = write_embedding(repo, "big", matrix)
    del matrix
    spec = CnnSpec(embedding_dim=DIM, filter_widths=(1, 2, 3), num_filters=16, num_classes=4)
    version = repo / "big-model" / "1"
    version.mkdir(parents=True)
    graph = tf.Graph()
    with graph.as_default():
        build_cnn(spec, lookup=None, seed=0)  # the embedding is fed: not in the checkpoint
        variables = {v.op.name: v for v in tf.compat.v1.trainable_variables()}
        init = tf.compat.v1.global_variables_initializer()
        saver = tf.compat.v1.train.Saver(var_list=variables)
    with tf.compat.v1.Session(graph=graph) as session:
        session.run(init)
        saver.save(session, str(version / "model.ckpt"), write_meta_graph=False)
    write_manifest(
        version,
        name="big-model",
        fmt=ModelFormat.STRIPPED,
        spec=spec,
        embedding=embedding_ref(emb_dir),
    )
    models = {
        "models": [{"name": "big-model", "base_path": "big-model"}],
        "embeddings": [{"name": "big", "path": "embeddings/big"}],
    }
    (repo / "models.yaml").write_text(json.dumps(models), encoding="utf-8")
    return repo


def settle(served: ServeProcess) -> int:
    """RSS once it stops moving (freed pages are returned asynchronously by some allocators)."""
    last = served.rss()
    for _ in range(20):
        time.sleep(0.25)
        now = served.rss()
        if abs(now - last) < 2 * MiB:
            return now
        last = now
    return last


@pytest.mark.timeout(600)
def test_unload_gives_the_memory_back(tmp_path: Path) -> None:
    repo = build_repo(tmp_path)
    embedding_bytes = ROWS * DIM * 4
    with (
        serving(repo, env={"TEXTSERVE_ADMIN_TOKEN": TOKEN}, log=tmp_path / "serve.log") as served,
        httpx.Client(base_url=served.url, timeout=120) as c,
    ):
        body = {"texts": [" ".join(f"w{i}" for i in range(50, 90))] * 8}
        assert c.post("/v1/models/big-model:classify", json=body).status_code == 200
        loaded = settle(served)
        samples = {"loaded": loaded}
        for cycle in (1, 2, 3):
            assert c.post("/v2/repository/models/big-model/unload", headers=AUTH).status_code == 200
            samples[f"unloaded {cycle}"] = settle(served)
            assert c.post("/v1/models/big-model:classify", json=body).status_code == 503
            assert c.post("/v2/repository/models/big-model/load", headers=AUTH).status_code == 200
            assert c.post("/v1/models/big-model:classify", json=body).status_code == 200
            samples[f"reloaded {cycle}"] = settle(served)
    print("\nRSS MiB: " + ", ".join(f"{k} {v / MiB:.0f}" for k, v in samples.items()))
    freed = loaded - samples["unloaded 1"]
    # The embedding (117 MiB) is given back, not just marked free inside the process.
    assert freed >= 0.8 * embedding_bytes, samples
    # Load/unload cycles do not ratchet memory up.
    assert samples["unloaded 3"] <= samples["unloaded 1"] + 16 * MiB, samples
    assert samples["reloaded 3"] <= loaded + 16 * MiB, samples
