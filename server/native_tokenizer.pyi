"""Types of the compiled :mod:`server.native_tokenizer` (see its ``.pyx`` for the docs)."""

import numpy as np
import numpy.typing as npt

SLOT_BYTES: int
MAX_LOAD: float

def build_table(hashes: npt.NDArray[np.uint64]) -> tuple[npt.NDArray[np.uint8], int]: ...
def encode_batch(
    texts: list[str],
    lowercase: bool,
    limit: int,
    min_width: int,
    max_width: int,
    slots: npt.NDArray[np.uint8],
    count: int,
    missing: int,
) -> npt.NDArray[np.int32] | None: ...
def lookup(
    hashes: npt.NDArray[np.uint64], slots: npt.NDArray[np.uint8], count: int, missing: int
) -> npt.NDArray[np.int32]: ...
