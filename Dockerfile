# ctlpool in a container: the supervisor and its workers, configured by CTLPOOL_* variables.
#
#   docker build -t ctlpool .
#   docker run -d --name ctlpool --stop-timeout 90 \
#     -e CTLPOOL_CONTROLLERS=controllers.deployments:Deployments,controllers.deployments:Instances \
#     -e CTLPOOL_AMQP_URL_FILE=/run/secrets/amqp-url -v /etc/ctlpool/amqp-url:/run/secrets/amqp-url:ro \
#     -p 127.0.0.1:9464:9464 ctlpool
#
# --stop-timeout (compose: stop_grace_period) must exceed CTLPOOL_DRAIN_TIMEOUT_S (60 s) + 5 s:
# docker's default of 10 s would SIGKILL workers in the middle of their drain.
# Your own controllers: build FROM this image and pip install your package (as root, then USER ctlpool).

# ---- build: the wheel of this repository and of its dependencies
FROM python:3.11-slim-bookworm AS build
WORKDIR /src
# Only what the wheel needs (.dockerignore keeps everything else out of the context).
COPY pyproject.toml README.md ./
COPY pool ./pool
COPY controllers ./controllers
RUN python -m pip wheel --no-cache-dir --wheel-dir /wheels .

# ---- run: slim, unprivileged, no compilers, no pip cache
FROM python:3.11-slim-bookworm
# tini as PID 1: forwards SIGTERM to the supervisor (which drains its workers) and reaps
# zombies. Without it, run with `docker run --init`.
RUN apt-get update \
 && apt-get install -y --no-install-recommends tini \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --user-group --home-dir /var/lib/ctlpool --create-home \
            --shell /usr/sbin/nologin ctlpool
COPY --from=build /wheels /tmp/wheels
RUN python -m pip install --no-cache-dir --no-index --find-links /tmp/wheels ctlpool \
 && rm -rf /tmp/wheels
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    CTLPOOL_LOG_FORMAT=json \
    CTLPOOL_METRICS_PORT=9464 \
    CTLPOOL_METRICS_HOST=0.0.0.0
USER ctlpool
WORKDIR /var/lib/ctlpool
EXPOSE 9464
# /livez: the supervisor loop is turning. (Readiness, for an orchestrator: /readyz.)
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
  CMD python -c 'import os, urllib.request; urllib.request.urlopen("http://127.0.0.1:%s/livez" % os.environ.get("CTLPOOL_METRICS_PORT", "9464"), timeout=4)' || exit 1
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/bin/tini", "--"]
CMD ["ctlpool", "run"]
