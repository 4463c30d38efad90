# textserve: a multi-model CPU inference server for TensorFlow text classifiers.
#
#   docker build -t textserve .                                # the server (default target)
#   docker run -p 8000:8000 -v "$PWD/model_repository:/models:ro" textserve
#   docker build --target demo -t textserve:demo .             # the server + the demo model set
#   docker run -p 8000:8000 textserve:demo
#
# BASE_IMAGE may be any Debian-like image with python3 3.11 and its venv module on PATH
# (python:3.11-slim has it in /usr/local/bin, a Debian bookworm image in /usr/bin): every stage
# starts from the same base, so the venv's interpreter link stays valid in the final image.
# Podman: build with `--format docker`, or the HEALTHCHECK is dropped (OCI images have none).
#
# Stages:  deps (venv of dependencies) → build (wheel) → runtime (default, last)
#          demo-build (build + toolchain extras + wordnet-base: trains the demo set) → demo
ARG BASE_IMAGE=python:3.11-slim

# ---------------------------------------------------------------------------------------------
# deps: a venv holding the server's runtime dependencies only (no [dev], no [toolchain]).
# Its own layer, keyed on pyproject.toml alone, so a code change does not re-download TensorFlow.
FROM ${BASE_IMAGE} AS deps
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python3 -m venv /opt/textserve
COPY pyproject.toml /src/pyproject.toml
RUN python3 -c "import tomllib; \
d = tomllib.load(open('/src/pyproject.toml', 'rb')); \
print('\n'.join(d['project']['dependencies']))" > /src/requirements.txt \
 && /opt/textserve/bin/pip install -r /src/requirements.txt \
 && rm -rf /opt/textserve/lib/python3*/site-packages/tensorflow/include
# (tensorflow/include: ~290 MB of C++ headers, only needed to compile custom ops)

# ---------------------------------------------------------------------------------------------
# build: the textserve wheel. Installed twice: into the venv (checked, and used by demo-build),
# and under /staging, which holds only textserve's own files: the runtime image adds them as a
# small layer on top of the unchanged dependency layer.
# A C compiler (and Python's headers, if the base image lacks them) compiles the batch tokenizer
# (server/native_tokenizer.pyx) into the wheel; the runtime image gets the built module only.
FROM deps AS build
RUN python3 -c "import os, sysconfig; raise SystemExit(not os.path.exists(os.path.join(sysconfig.get_paths()['include'], 'Python.h')))" \
 || headers=python3-dev; \
    apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends gcc libc6-dev ${headers:-} \
 && rm -rf /var/lib/apt/lists/*
COPY README.md /src/README.md
COPY server /src/server
COPY models /src/models
RUN /opt/textserve/bin/pip wheel --no-deps --wheel-dir /src/dist /src \
 && /opt/textserve/bin/pip install --no-deps /src/dist/textserve-*.whl \
 && /opt/textserve/bin/pip install --no-deps --ignore-installed --root /staging /src/dist/textserve-*.whl \
 && /opt/textserve/bin/textserve --version \
 && /opt/textserve/bin/python -c "import server.native_tokenizer"

# ---------------------------------------------------------------------------------------------
# demo-build: trains and exports the demo model set into /models (needs the [toolchain] extras
# and Debian's wordnet-base). Only built for `--target demo`; nothing of it but /models is kept.
FROM build AS demo-build
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends wordnet-base \
 && rm -rf /var/lib/apt/lists/*
RUN /opt/textserve/bin/pip install "$(ls /src/dist/textserve-*.whl)[toolchain]"
# DEMO_ARGS: extra build-demo flags, e.g. --quick (the small test set, ~1 min) or --no-baseline
ARG DEMO_ARGS=""
RUN /opt/textserve/bin/textserve build-demo --repo /models ${DEMO_ARGS}

# ---------------------------------------------------------------------------------------------
# runtime: the base image + the venv. No compiler, no pip cache, no sources, not root.
FROM ${BASE_IMAGE} AS runtime-base
RUN useradd --create-home --uid 10001 --user-group --shell /usr/sbin/nologin textserve \
 && mkdir /models
COPY --from=deps /opt/textserve /opt/textserve
COPY --from=build /staging/opt/textserve /opt/textserve
ENV PATH=/opt/textserve/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    TEXTSERVE_HOST=0.0.0.0 \
    TEXTSERVE_PORT=8000 \
    TEXTSERVE_REPO=/models
WORKDIR /home/textserve
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python3", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/v2/health/ready' % os.environ.get('TEXTSERVE_PORT', '8000'), timeout=4)"]
USER 10001:10001
# exec form: textserve itself is PID 1, so `docker stop`'s SIGTERM reaches it (graceful drain)
ENTRYPOINT ["textserve", "serve"]

# demo: the runtime image with the demo model set baked in at /models (read-only to the server).
FROM runtime-base AS demo
COPY --from=demo-build --chown=root:root /models /models

# runtime (default target): the model repository is a volume, mounted read-only at /models.
FROM runtime-base AS runtime
VOLUME ["/models"]
