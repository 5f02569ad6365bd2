#!/usr/bin/env bash
# image_base.sh: the local base image the CI image builds use instead of python:3.12-slim /
# ubuntu:24.04 (no registry is reachable here). Debian bookworm minbase from debootstrap with
# Debian's python3 (3.11), python3-venv and python-is-python3, imported with `podman import`.
#
# It carries this machine's CA bundle, and pip is pointed at it (/etc/pip.conf): PyPI is
# reached through a TLS proxy whose CA the host trusts, and pip in a build fails with
# CERTIFICATE_VERIFY_FAILED otherwise. Because of that bundle this base is for local builds
# only, never for an image that is pushed.
#
# Cached: the image is kept in the containers storage and rebuilt only when this script or
# the host CA bundle changes (their hash is the image's tag); the debootstrap tarball is kept
# in $KIMIVL_IMAGE_CACHE (default /var/cache/kimivl-images) for the same key.
#
#   scripts/image_base.sh            # prints the image reference, e.g. localhost/kimivl-base:bookworm-3f2a...
set -euo pipefail

SUITE=bookworm
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
CA_BUNDLE=${CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}
CACHE=${KIMIVL_IMAGE_CACHE:-/var/cache/kimivl-images}
NAME=localhost/kimivl-base

log() { echo "[image-base] $*" >&2; }

[[ -r $CA_BUNDLE ]] || { log "no CA bundle at $CA_BUNDLE (set CA_BUNDLE)"; exit 1; }
for tool in debootstrap podman buildah; do
    command -v "$tool" > /dev/null || { log "$tool is not installed (apt-get install buildah podman debootstrap)"; exit 1; }
done

key=$( { cat "$0"; echo "$SUITE $MIRROR"; cat "$CA_BUNDLE"; } | sha256sum | cut -c1-12)
ref="$NAME:$SUITE-$key"
if podman image exists "$ref"; then
    log "cached: $ref"
    echo "$ref"
    exit 0
fi

mkdir -p "$CACHE"
tarball="$CACHE/$SUITE-minbase-$key.tar"
if [[ ! -s $tarball ]]; then
    root=$(mktemp -d "$CACHE/rootfs.XXXXXX")
    trap 'rm -rf "$root"' EXIT
    log "debootstrap --variant=minbase $SUITE (python3, python3-venv, python-is-python3) from $MIRROR"
    t0=$SECONDS
    debootstrap --variant=minbase --include=python3,python3-venv,python-is-python3,ca-certificates \
        "$SUITE" "$root" "$MIRROR" > "$CACHE/debootstrap.log" 2>&1 \
        || { tail -n 30 "$CACHE/debootstrap.log" >&2; exit 1; }
    # The host's trust store, where pip, apt's https and update-ca-certificates all find it:
    # as the bundle itself, and as single certificates under /usr/local/share/ca-certificates so
    # a later update-ca-certificates (a package's trigger in a build) keeps them.
    install -m 0644 "$CA_BUNDLE" "$root/etc/ssl/certs/ca-certificates.crt"
    mkdir -p "$root/usr/local/share/ca-certificates/host"
    awk -v dir="$root/usr/local/share/ca-certificates/host" '
        /-----BEGIN CERTIFICATE-----/ { n++; f = sprintf("%s/host-%04d.crt", dir, n) }
        f { print > f }
        /-----END CERTIFICATE-----/ { close(f); f = "" }' "$CA_BUNDLE"
    printf '[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n' > "$root/etc/pip.conf"
    rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/var/cache/apt/archives/*.deb
    tar --numeric-owner -C "$root" -cf "$tarball.tmp" .
    mv "$tarball.tmp" "$tarball"
    rm -rf "$root"
    trap - EXIT
    log "debootstrap took $((SECONDS - t0)) s"
fi

log "podman import $tarball as $ref"
podman import --change 'CMD ["/bin/bash"]' --change 'ENV LANG=C.UTF-8' "$tarball" "$ref" > /dev/null
# Older keys of this base are dead weight in the storage.
podman images --format '{{.Repository}}:{{.Tag}}' | grep "^$NAME:" | grep -vx "$ref" | xargs -r podman rmi > /dev/null 2>&1 || true
find "$CACHE" -maxdepth 1 -name "$SUITE-minbase-*.tar" ! -name "$(basename "$tarball")" -delete
echo "$ref"
