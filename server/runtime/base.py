"""What every runtime (one per on-disk format) gives the registry: a session-backed model.

A runtime owns one ``tf.Graph`` + ``tf.compat.v1.Session`` for one model version. Token ids go
in, probabilities come out. Embedding rows are gathered from the process-wide
:class:`~server.embeddings.EmbeddingStore` (one copy per distinct embedding) and fed to the
graph's ``embedding/lookup`` tensor, so no session ever holds a private copy of a shared matrix.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np
import numpy.typing as npt

from server.artifact import ModelManifest
from server.text import IdArray, Tokenizer

ProbArray = npt.NDArray[np.float32]


class Runtime(ABC):
    """A loaded model version. ``predict`` is thread-safe and called off the event loop."""

    manifest: ModelManifest
    tokenizer: Tokenizer

    @property
    def labels(self) -> tuple[str, ...]:
        return self.manifest.labels

    @abstractmethod
    def predict(self, ids: IdArray) -> ProbArray:
        """Probabilities ``[batch, num_labels]`` for padded ids ``[batch, length]``."""

    @property
    @abstractmethod
    def own_bytes(self) -> int:
        """Exact bytes of this model's own tensors (weights), excluding shared embeddings."""

    @property
    @abstractmethod
    def embedding_key(self) -> str | None:
        """sha256 of the shared embedding this runtime reads from the store (None if none)."""

    @abstractmethod
    def close(self) -> None:
        """Close the session and release the embedding reference."""
