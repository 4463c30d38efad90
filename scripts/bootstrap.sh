#!/usr/bin/env bash
# Create the virtualenv, install textserve with its dev extras, and the Debian packages the
# toolchain and tests use (WordNet glosses, promtool/Prometheus, nginx, wrk).
set -euo pipefail
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
cd "$(dirname "$0")/.."
scripts/system-deps.sh
if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install --quiet --upgrade pip
if ! "$VENV/bin/python" -c 'import os, sysconfig; raise SystemExit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))'; then
    echo "bootstrap: no Python.h for $("$VENV/bin/python" --version): the compiled tokenizer" \
        "(server/native_tokenizer.pyx) cannot be built; install python3-dev" >&2
fi
"$VENV/bin/python" -m pip install --quiet --editable ".[dev]"
echo "bootstrap: $VENV ready ($("$VENV/bin/python" --version))"
