#!/usr/bin/env bash
# The trainer container's entrypoint: train and export $CONVEYOR_TRAIN_TASK into
# $CONVEYOR_ARTIFACTS/$CONVEYOR_TRAIN_NAME, unless a model.onnx is already there (a restarted stack reuses it).
# Work happens in a staging directory that is moved into place only once export has verified the model, so a
# failed or interrupted run never leaves a half-written artifact that the server (or the next run) would take.
set -euo pipefail

task="${CONVEYOR_TRAIN_TASK:-language}"
name="${CONVEYOR_TRAIN_NAME:-$task}"
root="${CONVEYOR_ARTIFACTS:-/artifacts}"
out="$root/$name"
# The model's name is its directory's name, hence staging/<name> rather than a renamed sibling.
staging="$root/.staging/$name"

if [[ -f "$out/model.onnx" && -f "$out/model.json" ]]; then
    echo "conveyor-trainer: $out/model.onnx exists, skipping training (remove the volume to retrain)"
    exit 0
fi

rm -rf "$staging"
mkdir -p "$staging"
echo "conveyor-trainer: training task '$task' into $out"
conveyor train --task "$task" --out "$staging" "$@"
conveyor export "$staging"
rm -rf "$out"
mv "$staging" "$out"
rmdir "$root/.staging" 2>/dev/null || true
echo "conveyor-trainer: artifact ready: $(ls "$out")"
