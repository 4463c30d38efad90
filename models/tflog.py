"""Keep TensorFlow's start-up and deprecation chatter out of the toolchain commands' output."""

from __future__ import annotations

import logging
import os
import sys


def quiet_tensorflow() -> None:
    """Hide TensorFlow's Python deprecation notices (the TF1 APIs the exporters use on
    purpose) and, where TensorFlow honours ``TF_CPP_MIN_LOG_LEVEL``, its C++ INFO lines.
    Errors still show. TF 2.21 prints a few start-up lines before it reads the variable.

    Call before TensorFlow is imported; an explicit ``TF_CPP_MIN_LOG_LEVEL`` is respected.
    """
    if "tensorflow" not in sys.modules:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    logging.getLogger("tensorflow").setLevel(logging.ERROR)
