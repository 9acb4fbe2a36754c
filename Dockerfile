# The rerank proxy: one Python file and aiohttp, on a slim image, as a non-root user.
FROM python:3.12-slim

# The proxy's version, for the image's label: the same as PROXY_VERSION in proxy-classifier.py (a fast test compares).
ARG PROXY_VERSION=1.0
LABEL org.opencontainers.image.title="rerank-proxy" \
      org.opencontainers.image.version="${PROXY_VERSION}"

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Not "proxy": Debian's base-passwd already has a system user of that name (uid 13), in every Debian-based image.
RUN useradd --create-home --uid 10001 reranker
WORKDIR /app

# Requirements first, in their own layer: a change to the code does not reinstall them.
COPY requirements.txt requirements-speedups.txt ./
RUN pip install -r requirements.txt -r requirements-speedups.txt

COPY proxy-classifier.py ./

USER reranker
EXPOSE 8002
# Every option is an environment variable too (INFINITY_URL, MODEL, BATCH_SIZE, API_KEY, ...).
# Outside a container the proxy listens on 127.0.0.1 only; a container must listen on every interface to be
# reached through its published port. Set API_KEY when the port is reachable by others.
ENV INFINITY_URL=http://infinity:7997/v1 \
    HOST=0.0.0.0

# Slim images have no curl: the probe uses Python's standard library, on the port the proxy listens on (PORT).
HEALTHCHECK --interval=15s --timeout=5s --start-period=5s --retries=3 \
    CMD ["python", "-c", "import os, sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('PORT', '8002'), timeout=4).status != 200)"]

# SIGTERM stops accepting, lets requests in flight finish (up to --timeout), then exits.
STOPSIGNAL SIGTERM
CMD ["python", "proxy-classifier.py"]
