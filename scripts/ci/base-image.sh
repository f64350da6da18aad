#!/usr/bin/env bash
# Make a Debian 12 base image without any registry: debootstrap from the Debian mirror apt uses, then
# `docker import`. The image has python3 + venv + CA certificates (what the Dockerfile's cpu target needs
# from its base).
#
#   scripts/ci/base-image.sh [TAG]        # default TAG: qsmprep-ci/bookworm-base:latest
#
# Needs root and a running docker daemon (DOCKER_HOST). Installs debootstrap when missing.
# QSMPREP_DEBIAN_MIRROR overrides the mirror (default: the first URIs: line of apt's debian.sources).
set -euo pipefail
TAG=${1:-qsmprep-ci/bookworm-base:latest}
log() { printf '[base-image] %s\n' "$*" >&2; }
[ "$(id -u)" = 0 ] || { log "debootstrap needs root"; exit 3; }
if ! command -v debootstrap >/dev/null; then
    log "installing debootstrap"
    export DEBIAN_FRONTEND=noninteractive
    apt-cache policy debootstrap 2>/dev/null | grep -q 'Candidate: [0-9]' || timeout 300 apt-get update -qq
    timeout 600 apt-get install -y -qq --no-install-recommends debootstrap >/dev/null
fi
mirror=${QSMPREP_DEBIAN_MIRROR:-}
if [ -z "$mirror" ]; then
    mirror=$(sed -n 's/^URIs:[[:space:]]*\([^[:space:]]*\).*/\1/p' /etc/apt/sources.list.d/debian.sources 2>/dev/null \
             | grep -v security | head -1 || true)
fi
if [ -z "$mirror" ]; then
    mirror=$(awk '$1 == "deb" && $2 !~ /security/ {print $2; exit}' /etc/apt/sources.list 2>/dev/null || true)
fi
mirror=${mirror:-http://deb.debian.org/debian}
rootfs=$(mktemp -d /var/tmp/qsmprep-rootfs.XXXXXX)
trap 'rm -rf "$rootfs"' EXIT
log "debootstrap bookworm from $mirror"
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
    bookworm "$rootfs" "$mirror" > "$rootfs.log" 2>&1 || { tail -30 "$rootfs.log" >&2; exit 1; }
rm -f "$rootfs.log"
# apt caches and lists are not needed in the image (apt-get update works again when needed)
rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* "$rootfs"/usr/share/doc/* \
       "$rootfs"/usr/share/man/*
log "docker import -> $TAG"
tar -C "$rootfs" -c . | docker import --change 'ENV LANG=C.UTF-8' - "$TAG" >/dev/null
docker image inspect "$TAG" --format '[base-image] {{.Id}} {{.Size}} bytes' >&2
