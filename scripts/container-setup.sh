#!/usr/bin/env bash
# Prepare a container engine for the container tier (test_container.py) on a Debian machine that has no Docker
# engine and cannot pull from an image registry, as CI's machines are. Run it as root, after ./setup.sh --dev.
# Safe to run again: every step checks first, and the slow one (the base image, about a minute) is done once.
#
#   1. podman, runc and debootstrap from apt;
#   2. /etc/containers/containers.conf: runc (crun refuses hybrid cgroups) and no default ulimits (setrlimit is
#      refused on these VMs);
#   3. a stand-in for python:3.12-slim (Debian bookworm, its python3, tagged so that the Dockerfile builds unchanged);
#   4. podman-compose into .venv, where the tests find it;
#   5. a stand-in for the LiteLLM gateway image that docker-compose.yaml names (litellm[proxy] on the stand-in base);
#   6. the fake-Infinity image (the test suite's fake, tests/fake-infinity/Containerfile).
set -euo pipefail
cd "$(dirname "$0")/.."

BASE_IMAGE=python:3.12-slim
LITELLM_IMAGE=$(sed -n 's/^ *image: *\(.*litellm.*\)$/\1/p' docker-compose.yaml | head -n 1)
LITELLM_VERSION=1.106.2
FAKE_INFINITY_IMAGE=localhost/rerank-proxy-fake-infinity
PODMAN_COMPOSE_VERSION=1.6.0
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
STAND_IN_LABEL=org.opencontainers.image.description="stand-in built by scripts/container-setup.sh"

say() { echo "==> $*"; }

if [ "$(id -u)" != 0 ]; then
    echo "container-setup.sh: run it as root (it installs packages and writes /etc/containers)" >&2
    exit 1
fi
if [ ! -x .venv/bin/python ]; then
    echo "container-setup.sh: run ./setup.sh --dev first (podman-compose goes into .venv)" >&2
    exit 1
fi

missing=()
for tool in podman runc debootstrap; do
    command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
if [ "${#missing[@]}" -gt 0 ]; then
    say "installing ${missing[*]} (apt)"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq podman runc debootstrap >/dev/null
fi

conf=/etc/containers/containers.conf
wanted=$'# Written by scripts/container-setup.sh.\n[containers]\ndefault_ulimits = []\n\n[engine]\nruntime = "runc"'
if [ "$(cat "$conf" 2>/dev/null)" != "$wanted" ]; then
    say "writing $conf (runc, no default ulimits)"
    [ -e "$conf" ] && cp "$conf" "$conf.before-container-setup"
    mkdir -p /etc/containers
    printf '%s\n' "$wanted" >"$conf"
fi

# Podman's build, with the image's HEALTHCHECK kept (OCI format drops it), never pulling, and pip inside reaching
# the package registry the way the host does.
build() { podman build --quiet --format docker --network host --pull=never "$@" >/dev/null; }

if podman image exists "$BASE_IMAGE"; then
    say "$BASE_IMAGE is there"
else
    say "building a stand-in for $BASE_IMAGE with debootstrap (about a minute)"
    work=$(mktemp -d /var/tmp/container-setup.XXXXXX)
    trap 'rm -rf "$work"' EXIT
    debootstrap --variant=minbase --include=python3,python3-pip,python3-venv,ca-certificates \
        bookworm "$work/rootfs" "$MIRROR" >"$work/debootstrap.log" 2>&1 \
        || { tail -n 20 "$work/debootstrap.log" >&2; exit 1; }
    rm -rf "$work"/rootfs/var/cache/apt/archives/*.deb "$work"/rootfs/var/lib/apt/lists/*
    tar -C "$work/rootfs" -c . | podman import --quiet - localhost/debian-bookworm-python:rootfs >/dev/null
    # The host's CA bundle: pip in a build reaches the registry through whatever the host trusts.
    cp /etc/ssl/certs/ca-certificates.crt "$work/ca-certificates.crt"
    cat >"$work/Containerfile" <<'EOF'
FROM localhost/debian-bookworm-python:rootfs
COPY ca-certificates.crt /etc/ssl/certs/ca-certificates.crt
RUN ln -s /usr/bin/python3 /usr/local/bin/python && ln -s /usr/bin/pip3 /usr/local/bin/pip \
    && rm -f /usr/lib/python3*/EXTERNALLY-MANAGED
CMD ["python3"]
EOF
    build --label "$STAND_IN_LABEL" -t "$BASE_IMAGE" "$work"
    podman rmi localhost/debian-bookworm-python:rootfs >/dev/null
    rm -rf "$work"
    trap - EXIT
fi

if [ "$(.venv/bin/python -m pip show podman-compose 2>/dev/null | sed -n 's/^Version: //p')" != "$PODMAN_COMPOSE_VERSION" ]; then
    say "installing podman-compose $PODMAN_COMPOSE_VERSION into .venv"
    .venv/bin/python -m pip install --quiet --disable-pip-version-check "podman-compose==$PODMAN_COMPOSE_VERSION"
fi

if [ -z "$LITELLM_IMAGE" ]; then
    echo "container-setup.sh: docker-compose.yaml names no LiteLLM image" >&2
    exit 1
elif podman image exists "$LITELLM_IMAGE"; then
    say "$LITELLM_IMAGE is there"
else
    say "building a stand-in for $LITELLM_IMAGE (litellm[proxy]==$LITELLM_VERSION; a few minutes)"
    work=$(mktemp -d /var/tmp/container-setup.XXXXXX)
    printf '%s\n' "FROM $BASE_IMAGE" \
        "ENV LITELLM_LOCAL_MODEL_COST_MAP=True DO_NOT_TRACK=1 PIP_NO_CACHE_DIR=1" \
        "RUN pip install --quiet 'litellm[proxy]==$LITELLM_VERSION'" \
        'ENTRYPOINT ["litellm"]' \
        'CMD ["--port", "4000"]' >"$work/Containerfile"
    build --label "$STAND_IN_LABEL" -t "$LITELLM_IMAGE" "$work"
    rm -rf "$work"
fi

say "building $FAKE_INFINITY_IMAGE (tests/fake-infinity/Containerfile)"
build -t "$FAKE_INFINITY_IMAGE" -f tests/fake-infinity/Containerfile .
say "done. Run the container tier:  .venv/bin/python -m pytest -m container"
