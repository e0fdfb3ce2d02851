#!/usr/bin/env bash
# Build the local base image for machines without a container registry: a minimal Debian bookworm rootfs
# (debootstrap, python3 3.11; redis-server and nginx for the compose profile "scale") imported with
# `docker import`. Skipped when the image already exists (the tag's -2: the first had no redis-server, nginx).
# Usage: scripts/build_local_base.sh [IMAGE]   (default conveyor-base:bookworm-2)
set -euo pipefail

image="${1:-${CONVEYOR_BASE_IMAGE:-conveyor-base:bookworm-2}}"
mirror="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"

if docker image inspect "$image" >/dev/null 2>&1; then
    echo "base image $image exists, skipping debootstrap"
    exit 0
fi

rootfs="$(mktemp -d /var/tmp/conveyor-rootfs.XXXXXX)"
trap 'rm -rf "$rootfs"' EXIT
# mktemp makes the directory 0700, and it becomes the image's /: non-root users could then run nothing.
chmod 0755 "$rootfs"

echo "debootstrap bookworm into $rootfs"
# libstdc++6 and libgomp1: the manylinux wheels (onnxruntime, torch) expect them from the system.
debootstrap --variant=minbase --include=python3,python3-venv,libstdc++6,libgomp1,redis-server,nginx \
    bookworm "$rootfs" "$mirror" >/dev/null
# Slim the image: apt lists, docs and caches are not needed at run time.
rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin "$rootfs"/usr/share/doc/* \
    "$rootfs"/usr/share/man/* "$rootfs"/usr/share/locale/*
tar -C "$rootfs" -c . | docker import \
    --change 'ENV LANG=C.UTF-8' \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'CMD ["/bin/bash"]' \
    - "$image" >/dev/null
echo "built $image ($(docker image inspect --format '{{.Size}}' "$image") bytes)"
