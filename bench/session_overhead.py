"""What one more TensorFlow session costs, whatever the model: the floor under every model.

    python -m bench.session_overhead [--models 10] [--filters 2] [--dim 8] [--run]

Builds ``--models`` tiny CNNs (``--filters`` filters over ``--dim`` dimensions: a few KiB of
weights), each in its own ``tf.Graph`` + ``Session`` as textserve serves them, after
TensorFlow's one-off runtime init, and prints the anonymous-memory growth per model (exact:
``/proc/self/smaps_rollup``, after ``malloc_trim``). With ``--run`` each session also runs one
64 x 50 batch. The memory report's int8 target is judged against this floor
(docs/memory/README.md).
"""

from __future__ import annotations

import argparse
import gc

import numpy as np

from models.commands.memory_report import _baseline, _measure
from server import allocator
from server.artifact import CnnSpec
from server.graph import build_cnn


def per_model_mib(models: int, filters: int, dim: int, run: bool) -> float:
    import tensorflow as tf

    v1 = tf.compat.v1
    _baseline()  # TensorFlow imported and its runtime initialised

    def anon() -> int:
        gc.collect()
        allocator.trim()
        return _measure()["anon"]

    before = anon()
    keep = []
    for _ in range(models):
        graph = tf.Graph()
        with graph.as_default():
            spec = CnnSpec(embedding_dim=dim, num_classes=20, num_filters=filters)
            net = build_cnn(spec, lookup=None)
            init = v1.global_variables_initializer()
        config = v1.ConfigProto(intra_op_parallelism_threads=2, inter_op_parallelism_threads=1)
        session = v1.Session(graph=graph, config=config)
        session.run(init)
        if run:
            feeds = [net.input_x, net.embedded, net.dropout_keep_prob]
            call = session.make_callable(net.probs, feeds)
            call(np.ones((64, 50), np.int32), np.zeros((64, 50, dim), np.float32), np.float32(1))
        keep.append((graph, session))
    return (anon() - before) / models / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=int, default=10)
    parser.add_argument("--filters", type=int, default=2)
    parser.add_argument("--dim", type=int, default=8)
    parser.add_argument("--run", action="store_true", help="run one 64 x 50 batch per session")
    args = parser.parse_args()
    mib = per_model_mib(args.models, args.filters, args.dim, args.run)
    print(
        f"{args.models} sessions, {args.filters} filters x {args.dim} dims, "
        f"{'with' if args.run else 'without'} a run: {mib:.2f} MiB anonymous memory per model"
    )


if __name__ == "__main__":
    main()
