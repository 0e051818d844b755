# syntax=docker/dockerfile:1
# The gateway as a container image. docs/deployment.md: how to build, configure and run it.
# No certificate, key or secret is ever in the image: they are mounted at run time under
# /run/secrets/ (see GATEWAY_TLS_CERT_FILE, GATEWAY_TLS_KEY_FILE, GATEWAY_JWT_SECRET_FILE).
# tests/test_dockerfile.py lints this file with hadolint and replays the build stage's RUN and
# the final stage's COPY, ENV, ENTRYPOINT and HEALTHCHECK without Docker: keep instructions in
# the plain forms it reads (one command per line joined by &&, exec-form JSON arrays).

# Both stages use the same base image: the venv's python is a symlink to its interpreter.
FROM python:3.11-slim-bookworm AS build

ENV PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
COPY pyproject.toml README.md constraints.txt ./
COPY gateway/ gateway/

# Why an editable install (-e): gateway/protocol.py and gateway/web.py find schemas/ and
# static/ beside the package directory (Path(__file__).parent.parent). A regular install puts
# the package in site-packages, where neither exists, and the gateway fails at import. This
# installs the pinned dependencies into /opt/venv plus a path hook naming /app/gateway; the
# final stage puts gateway/, schemas/ and static/ side by side in /app, at the same paths, so
# `python -m gateway` works from any directory. The Makefile installs the same way. The redis
# extra is the Redis client, for GATEWAY_BROKER_URL / GATEWAY_RATELIMIT_STORAGE_URL=redis://...
RUN python -m venv /opt/venv \
 && /opt/venv/bin/pip install --no-cache-dir -c constraints.txt -e ".[redis]"


FROM python:3.11-slim-bookworm

LABEL org.opencontainers.image.title="gateway" \
      org.opencontainers.image.description="A hardened real-time WebSocket gateway: authenticated JSON chat over wss" \
      org.opencontainers.image.version="0.1.0" \
      org.opencontainers.image.licenses="MIT"

# A fixed, unprivileged UID and GID, so mounted secrets can be owned to match
# (chown 10001:10001) and Kubernetes runAsNonRoot can check the numeric USER below.
RUN groupadd --gid 10001 gateway \
 && useradd --no-log-init --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin gateway

COPY --from=build /opt/venv /opt/venv
WORKDIR /app
# Owned by root: the gateway user can read its code but not change it.
COPY gateway/ /app/gateway/
COPY schemas/ /app/schemas/
COPY static/ /app/static/

# Production by default: the process refuses to start (exit status 2) on a weak secret, missing
# TLS files, the development token endpoint or no origin policy. The TLS files are expected
# where `docker run -v` or compose secrets mount them; GATEWAY_TLS=proxy needs none. The
# metrics listener binds every interface of the container; publish or route its port only to
# the Prometheus network.
ENV PATH="/opt/venv/bin:$PATH" \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    GATEWAY_ENV=production \
    GATEWAY_HOST=0.0.0.0 \
    GATEWAY_PORT=3001 \
    GATEWAY_TLS_CERT_FILE=/run/secrets/tls.crt \
    GATEWAY_TLS_KEY_FILE=/run/secrets/tls.key \
    GATEWAY_METRICS_HOST=0.0.0.0 \
    GATEWAY_METRICS_PORT=9102

USER 10001:10001
EXPOSE 3001 9102

# SIGTERM: /readyz and new upgrades answer 503 at once, open connections are closed with 1001
# spread over GATEWAY_SHUTDOWN_SPREAD_SECONDS (10), and the process exits 0 within
# GATEWAY_SHUTDOWN_GRACE_SECONDS (30). Docker's stop timeout must be longer: docker run
# --stop-timeout 35, compose stop_grace_period: 35s (Docker's default, 10 s, kills mid-drain).
STOPSIGNAL SIGTERM

# Liveness without curl: GET /healthz over https (certificate not verified: this is loopback),
# or plain http with GATEWAY_TLS=proxy. Any failure raises, and python exits 1 (unhealthy).
HEALTHCHECK --interval=15s --timeout=5s --start-period=10s --retries=3 \
  CMD ["python", "-c", "import os, ssl, urllib.request; tls = os.environ.get('GATEWAY_TLS', 'on').strip() != 'proxy'; url = ('https' if tls else 'http') + '://127.0.0.1:' + os.environ.get('GATEWAY_PORT', '3001').strip() + '/healthz'; urllib.request.urlopen(url, timeout=3, context=ssl._create_unverified_context() if tls else None)"]

ENTRYPOINT ["python", "-m", "gateway"]
CMD ["serve"]
