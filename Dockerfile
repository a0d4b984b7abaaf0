# clobjob image: the `clobjob` console script with the Kubernetes client, no embedded engine (pods talk to a
# ClickHouse server: no chDB, pandas or pyarrow), non-root, read-only root filesystem friendly (state only under
# /tmp and in ClickHouse).
#
#   docker build -t clobjob:dev .
#   docker run --rm clobjob:dev worker --help
ARG PYTHON_IMAGE=python:3.12-slim

# --- build: wheels for clobjob and its dependencies, installed into /opt/clobjob by the one install script ---
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY clobjob ./clobjob
COPY docker/install.sh /usr/local/bin/clobjob-install
RUN clobjob-install /src /opt/clobjob /tmp/wheels

# --- runtime: the venv alone, as user 10001 ---
FROM ${PYTHON_IMAGE}
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="clobjob" \
      org.opencontainers.image.description="Backfill Polymarket CLOB order fills into ClickHouse, one Indexed-Job pod per shard" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.base.name="${PYTHON_IMAGE}"
RUN groupadd --gid 10001 clobjob \
 && useradd --uid 10001 --gid 10001 --home-dir /tmp/clobjob --no-create-home --shell /usr/sbin/nologin clobjob
COPY --from=build /opt/clobjob /opt/clobjob
ENV PATH=/opt/clobjob/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    CLOBJOB_HOME=/tmp/clobjob \
    CLOBJOB_LOG_FORMAT=json
WORKDIR /tmp
USER 10001:10001
ENTRYPOINT ["clobjob"]
CMD ["--help"]
