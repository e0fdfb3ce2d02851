#!/usr/bin/env bash
# Download every wheel the images need into docker/wheelhouse/ (for PIP_OFFLINE=1 builds), on the host:
# the base dependencies, the `train` extra with torch pinned to its CPU build (torch==X+cpu, found in
# $TORCH_WHEELS when set, e.g. /opt/wheels, else on the PyTorch CPU index), and the build backend.
# The wheels are for CPython 3.11 on manylinux x86_64, the images' python3 (Debian bookworm's is 3.11).
# Skipped when the wheelhouse already matches pyproject.toml.
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
wheelhouse="$root/docker/wheelhouse"
python="${PYTHON:-$root/.venv/bin/python}"
[[ -x "$python" ]] || python=python3
torch_wheels="${TORCH_WHEELS:-/opt/wheels}"
torch_index="${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}"

requirements="$("$python" "$root/scripts/pyproject_requirements.py" "$root/pyproject.toml" \
    --extra train --torch-local-version cpu)"
build_requirements="$("$python" -c 'import sys, tomllib; print("\n".join(tomllib.load(open(sys.argv[1], "rb"))["build-system"]["requires"]))' "$root/pyproject.toml")"
# pip evaluates environment markers against the interpreter running it, not --python-version: a dependency
# that only older 3.11 releases need (Debian bookworm's python3 is 3.11.2) is named here, or it is missing.
marker_only="async-timeout>=4.0.3"  # redis-py: python_full_version < "3.11.3"
wanted="$(printf '%s\n%s\n%s\n' "$requirements" "$build_requirements" "$marker_only")"
stamp="$wheelhouse/.requirements"
if [[ -f "$stamp" ]] && [[ "$(cat "$stamp")" == "$wanted" ]]; then
    echo "wheelhouse is current ($(find "$wheelhouse" -name '*.whl' | wc -l) wheels), skipping download"
    exit 0
fi

sources=(--extra-index-url "$torch_index")
if [[ -d "$torch_wheels" ]]; then
    sources=(--find-links "$torch_wheels")
fi
# pip does not widen --platform to older glibc tags by itself: list every manylinux tag glibc 2.36 runs.
platforms=()
for minor in $(seq 36 -1 17); do
    platforms+=(--platform "manylinux_2_${minor}_x86_64")
done
platforms+=(--platform manylinux2014_x86_64 --platform manylinux2010_x86_64 --platform manylinux1_x86_64)
mkdir -p "$wheelhouse"
echo "downloading wheels into $wheelhouse"
# shellcheck disable=SC2086  # one requirement per word
"$python" -m pip download --quiet --disable-pip-version-check --dest "$wheelhouse" \
    --only-binary=:all: --implementation cp --python-version 3.11 --abi cp311 \
    "${platforms[@]}" "${sources[@]}" $wanted
# Not `find | grep -q .`: under pipefail, find dies of SIGPIPE once grep has exited, failing the test.
if [[ -n "$(find "$wheelhouse" \( -name 'nvidia_*.whl' -o -name 'triton-*.whl' \) -print -quit)" ]]; then
    echo "error: the wheelhouse holds CUDA wheels; torch must be the +cpu build" >&2
    exit 1
fi
printf '%s' "$wanted" >"$stamp"
echo "wheelhouse: $(find "$wheelhouse" -name '*.whl' | wc -l) wheels, $(du -sh "$wheelhouse" | cut -f1)"
