# The MaxEnt-GRPO service image: the CPU build by default.
#
#   docker build -t maxent-grpo .
#   docker build -t maxent-grpo:cuda \
#       --build-arg BASE_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04 \
#       --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 .
#
# The build runs the README's setup: torch of the release pyproject.toml pins
# from the chosen index first (the README's GPU recipe), then scripts/setup.sh
# (`pip install -e '.[server]'` into /app/.venv), the script CI runs.
ARG BASE_IMAGE=python:3.11-slim-bookworm

FROM ${BASE_IMAGE} AS build
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# CUDA base images come without Python; the python base image has it already.
# hadolint ignore=DL3008
RUN if ! command -v python3 >/dev/null; then \
        apt-get update \
        && apt-get install -y --no-install-recommends python3 python3-venv \
        && rm -rf /var/lib/apt/lists/*; \
    fi
WORKDIR /app
COPY pyproject.toml README.md ./
COPY scripts/setup.sh scripts/setup.sh
COPY proto/ proto/
COPY api/ api/
COPY client/ client/
COPY server/ server/
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python3 -m venv .venv \
    && torch_version="$(sed -n 's/^ *"torch==\([^"]*\)".*/\1/p' pyproject.toml)" \
    && test -n "${torch_version}" \
    && .venv/bin/python -m pip install --no-cache-dir "torch==${torch_version}" --index-url "${TORCH_INDEX_URL}"
RUN bash scripts/setup.sh \
    && .venv/bin/python -c "import maxent_server.app, maxent_server.healthcheck"

FROM ${BASE_IMAGE} AS runtime
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# hadolint ignore=DL3008
# bubblewrap: the sandbox of code_unit_tests (--enable-code-execution).
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends bubblewrap \
    && if ! command -v python3 >/dev/null; then apt-get install -y --no-install-recommends python3; fi \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 maxent \
    && useradd --system --uid 10001 --gid maxent --home-dir /data --no-create-home --shell /usr/sbin/nologin maxent \
    && mkdir -p /data \
    && chown maxent:maxent /data
COPY --from=build /app /app
ENV PATH=/app/.venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    MAXENT_HOST=0.0.0.0 \
    MAXENT_PORT=50051 \
    MAXENT_METRICS_PORT=9464 \
    MAXENT_DATA_DIR=/data
# Without MAXENT_AUTH_TOKENS (or MAXENT_INSECURE_ALLOW_REMOTE=1) the server
# binds only to loopback and says so: see docs/operations.md.
VOLUME ["/data"]
USER 10001:10001
WORKDIR /data
EXPOSE 50051 9464
# The gRPC health service on 127.0.0.1:$MAXENT_PORT; with TLS set
# MAXENT_HEALTHCHECK_TLS_CA (and _TLS_CERT/_TLS_KEY under mutual TLS).
HEALTHCHECK --interval=30s --timeout=10s --start-period=120s --retries=3 \
    CMD ["python", "-m", "maxent_server.healthcheck"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["maxent-server"]
