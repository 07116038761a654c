# One image for every Switchboard service. docker-compose.yml builds it once and
# picks the service per container with `python -m services.<svc>`; there is no
# default command, because every service needs its own configuration.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH

WORKDIR /app
RUN python -m venv /opt/venv

# Dependencies first (pinned in pyproject.toml), so that a code change does not
# reinstall them: the editable install needs only the top-level packages to
# exist, and maps them to /app, where the code is copied next. mypy-protobuf
# (the pin of pyproject.toml's dev extras) is there because
# scripts/gen_protos.py also writes the .pyi files.
COPY pyproject.toml ./
RUN mkdir services switchboard_client \
    && touch services/__init__.py switchboard_client/__init__.py \
    && pip install -e . mypy-protobuf==5.1.0

COPY protos ./protos
COPY scripts ./scripts
COPY services ./services
COPY switchboard_client ./switchboard_client

# The stubs are generated here, never copied in; gen/ is importable as the
# proto packages, as `make gen` sets it up.
RUN python scripts/gen_protos.py \
    && echo /app/gen > "$(python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/switchboard-gen.pth" \
    && python -c "import switchboard.auth.v1.auth_service_pb2_grpc, services.common.healthcheck" \
    && python -m compileall -q /app/services /app/switchboard_client /app/gen

# Unprivileged at run time; the data directory is the one place it writes.
RUN useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin switchboard \
    && mkdir -p /var/lib/switchboard \
    && chown switchboard:switchboard /var/lib/switchboard
USER 10001

EXPOSE 50051 50052 50053 50054 50055
