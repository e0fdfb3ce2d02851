#!/usr/bin/env bash
# Build the Prometheus image for machines without a registry from the host's Debian prometheus binary
# (apt-get install prometheus) on the local base image. Skipped when the image already exists.
# Usage: scripts/build_local_prometheus.sh [IMAGE]   (default conveyor-prometheus:2.42.0-debian)
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
image="${1:-${CONVEYOR_PROMETHEUS_IMAGE:-conveyor-prometheus:2.42.0-debian}}"
base="${CONVEYOR_BASE_IMAGE:-conveyor-base:bookworm-2}"
binary="${PROMETHEUS_BINARY:-/usr/bin/prometheus}"

if docker image inspect "$image" >/dev/null 2>&1; then
    echo "prometheus image $image exists, skipping"
    exit 0
fi
if [[ ! -x "$binary" ]]; then
    echo "error: $binary not found: apt-get install -y prometheus" >&2
    exit 1
fi

context="$(mktemp -d)"
trap 'rm -rf "$context"' EXIT
cp "$binary" "$context/prometheus"
cp "$root/docker/prometheus-local.Dockerfile" "$context/Dockerfile"
docker build --quiet --build-arg BASE_IMAGE="$base" -t "$image" "$context" >/dev/null
version=$("$binary" --version 2>&1) # whole, not `| head -n 1`: no SIGPIPE for the binary under pipefail
echo "built $image from ${version%%$'\n'*}"
