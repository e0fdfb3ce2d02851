#!/usr/bin/env bash
# End-to-end test of the compose deployment on a machine without a container registry (`make e2e-compose`):
#   1. tools: docker.io, docker-compose, debootstrap, prometheus (apt) and a running engine (dockerd, vfs);
#   2. offline inputs: the debootstrap base image, the host-downloaded wheelhouse, a Prometheus image from
#      Debian's binary (each cached: skipped when present);
#   3. the images, built with docker-compose.yml + docker-compose.offline.yml;
#   4. failure paths: a trainer that fails keeps the server from ever starting; the server image refuses an
#      empty or a corrupt model directory with a readable error;
#   5. the stack: up -d, server healthy, the France story streamed through 127.0.0.1:50051 with the host's
#      `conveyor stream` predicting "french", Prometheus's API returning conveyor_chunk_latency_seconds_count;
#   6. the profile "scale": two replicas on Redis behind nginx (127.0.0.1:50052); the story's first sentence
#      goes to one replica, that replica is killed (SIGKILL), and the rest of the story, through nginx to the
#      survivor, still predicts "french";
#   7. TLS (docker-compose.tls.yml): certificates from scripts/make_tls_certs.sh, the server recreated with them
#      and healthy by the file's TLS health check, the story streamed with `conveyor stream --ca` predicting
#      "french", a plaintext client refused.
# CONVEYOR_E2E_ARTIFACT=DIR (e.g. artifacts/language after `make demo`) seeds the volume with that exported
# model, so the trainer takes its skip path instead of training (minutes); by default it trains.
# Every stack it starts is taken down with `down -v` on exit, whatever happened. dockerd, when this script had to
# start it, is left running (later runs and the image cache need it).
set -euo pipefail

started_at=$(date +%s)
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"

project="${CONVEYOR_E2E_PROJECT:-conveyor-e2e}"
fail_project="$project-fail"
conveyor="${CONVEYOR_BIN:-$root/.venv/bin/conveyor}"
health_timeout_s="${CONVEYOR_E2E_HEALTH_TIMEOUT_S:-1200}" # includes training the model, on a cold run
# The filler between the two halves uses only the task's filler words (training/tasks/words.py).
story="i grew up in france . we lived near the river with my family and my father worked for a big company every summer i speak fluent"
files=(-f docker-compose.yml -f docker-compose.offline.yml)
tls_files=(-f docker-compose.tls.yml) # step 7 only; named in every `down`, which then removes its volume too
compose=()
scratch=""

log() { printf '\n== %s (%ds)\n' "$*" "$(($(date +%s) - started_at))"; }
die() { # message [details...]
    printf 'e2e-compose: FAILED: %s\n' "$1" >&2
    shift
    (($#)) && printf '%s\n' "$@" >&2
    exit 1
}

ensure_tools() {
    local missing=()
    command -v dockerd >/dev/null || missing+=(docker.io)
    command -v docker-compose >/dev/null || docker compose version >/dev/null 2>&1 || missing+=(docker-compose)
    command -v debootstrap >/dev/null || missing+=(debootstrap)
    command -v prometheus >/dev/null || missing+=(prometheus)
    if ((${#missing[@]})); then
        log "installing ${missing[*]}"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    fi
    if docker compose version >/dev/null 2>&1; then
        compose=(docker compose)
    else
        compose=(docker-compose)
    fi
}

ensure_engine() {
    if docker info >/dev/null 2>&1; then
        return
    fi
    log "starting dockerd (vfs storage driver); it stays running afterwards"
    mkdir -p /var/log/conveyor
    nohup dockerd --storage-driver=vfs >/var/log/conveyor/dockerd.log 2>&1 &
    for _ in $(seq 60); do
        docker info >/dev/null 2>&1 && return
        sleep 1
    done
    tail -n 20 /var/log/conveyor/dockerd.log >&2
    die "dockerd did not answer within 60 s"
}

cleanup() {
    local status=$?
    set +e
    if ((${#compose[@]})); then
        for name in "$fail_project" "$project"; do
            "${compose[@]}" -p "$name" "${files[@]}" "${tls_files[@]}" --profile scale down -v --remove-orphans \
                >/dev/null 2>&1
        done
    fi
    [[ -n "$scratch" ]] && rm -rf "$scratch"
    printf '\ne2e-compose: %s in %ds\n' "$([[ $status == 0 ]] && echo PASSED || echo FAILED)" \
        "$(($(date +%s) - started_at))"
    exit "$status"
}
trap cleanup EXIT
# A CI timeout or ^C: exit through the EXIT trap, so that the stacks still go down.
trap 'exit 143' TERM
trap 'exit 130' INT

container_of() { # project service -> container id ("" when none was created)
    docker ps -aq --filter "label=com.docker.compose.project=$1" --filter "label=com.docker.compose.service=$2"
}

check_trainer_failure_blocks_server() {
    log "a failing trainer keeps the server from starting"
    local output server_id trainer_id
    if output=$(CONVEYOR_TRAIN_TASK=no-such-task "${compose[@]}" -p "$fail_project" "${files[@]}" \
        up -d server 2>&1); then
        die "compose up succeeded although the trainer was given an unknown task" "$output"
    fi
    trainer_id=$(container_of "$fail_project" trainer)
    [[ -n "$trainer_id" ]] || die "the trainer container was never created" "$output"
    [[ "$(docker inspect -f '{{.State.ExitCode}}' "$trainer_id")" != 0 ]] || die "the trainer exited 0"
    log_has "$trainer_id" "unknown task" ||
        die "the trainer's log does not say why it failed" "$(docker logs "$trainer_id" 2>&1 | tail -n 5)"
    server_id=$(container_of "$fail_project" server)
    if [[ -n "$server_id" ]]; then
        # Compose v2 creates the dependent container and leaves it unstarted; v1 does not create it.
        [[ "$(docker inspect -f '{{.State.StartedAt}}' "$server_id")" == 0001-01-01T00:00:00Z ]] ||
            die "the server container started although the trainer failed"
    fi
    echo "ok: trainer exited $(docker inspect -f '{{.State.ExitCode}}' "$trainer_id") ('unknown task'), server never started"
    "${compose[@]}" -p "$fail_project" "${files[@]}" down -v --remove-orphans >/dev/null 2>&1
}

# A container's log holds TEXT. Not `docker logs | grep -q`: under pipefail, grep -q exits at its first match,
# docker logs (a long log: the training progress bar) then dies of SIGPIPE, and the pipeline fails.
log_has() { # container text
    local logs
    logs=$(docker logs "$1" 2>&1)
    grep -qF -- "$2" <<<"$logs"
}

expect_refusal() { # description model-dir-on-host expected-phrase
    local output status=0
    output=$(timeout 120 docker run --rm -v "$2:/artifacts/language:ro" conveyor-server:0.1.0 2>&1) || status=$?
    [[ $status == 1 ]] || die "server on $1: exit status $status, expected 1" "$output"
    [[ "$output" == *"conveyor serve: error:"*"$3"* ]] || die "server on $1: no readable error" "$output"
    [[ "$output" != *Traceback* ]] || die "server on $1: a traceback instead of a message" "$output"
    echo "ok: $1 -> $(grep "conveyor serve: error:" <<<"$output")"
}

check_server_refuses_bad_models() {
    log "the server refuses an empty or corrupt model directory"
    mkdir -p "$scratch/empty" "$scratch/corrupt"
    printf '{"name": "language", "onnx_sha256": "0"}' >"$scratch/corrupt/model.json"
    printf 'not an onnx graph' >"$scratch/corrupt/model.onnx"
    chmod -R a+rX "$scratch"
    expect_refusal "an empty model directory" "$scratch/empty" "model.onnx"
    expect_refusal "a corrupt model" "$scratch/corrupt" "model"
}

wait_healthy() { # [service]
    local service="${1:-server}"
    log "waiting for $service to be healthy (training runs first on a fresh volume)"
    local deadline=$(($(date +%s) + health_timeout_s)) server_id state
    while (($(date +%s) < deadline)); do
        server_id=$(container_of "$project" "$service")
        if [[ -n "$server_id" ]]; then
            state=$(docker inspect -f '{{.State.Status}} {{if .State.Health}}{{.State.Health.Status}}{{end}}' "$server_id")
            [[ "$state" == "running healthy" ]] && {
                echo "ok: $service $state"
                return
            }
            [[ "$state" == exited* ]] && die "$service exited" "$(docker logs "$server_id" 2>&1 | tail -n 20)"
        fi
        sleep 3
    done
    "${compose[@]}" -p "$project" "${files[@]}" logs --tail=30 >&2
    die "$service was not healthy within ${health_timeout_s}s"
}

check_trainer_ran_once() {
    local trainer_id expected
    trainer_id=$(container_of "$project" trainer)
    [[ "$(docker inspect -f '{{.State.ExitCode}}' "$trainer_id")" == 0 ]] || die "the trainer did not exit 0"
    expected="artifact ready"
    [[ -n "${CONVEYOR_E2E_ARTIFACT:-}" ]] && expected="skipping training"
    log_has "$trainer_id" "$expected" ||
        die "the trainer's log lacks '$expected'" "$(docker logs "$trainer_id" 2>&1 | tail -n 5)"
    echo "ok: trainer exited 0 ($expected)"
}

check_stream() {
    log "streaming the France story through 127.0.0.1:50051"
    local output
    # stderr (a progress bar) apart from the predictions, shown only when the stream fails.
    output=$(printf '%s' "$story" |
        "$conveyor" stream --target 127.0.0.1:50051 --top 3 - 2>"$scratch/stream.err") ||
        die "conveyor stream failed" "$output" "$(cat "$scratch/stream.err")"
    printf '%s\n' "$output"
    # The last chunk ends with "i speak fluent": its top predictions are for the word after it.
    predicts_french "$output" || die "'french' is not among the top predictions after 'i speak fluent'"
    echo "ok: 'french' predicted after 'i speak fluent'"
}

chunks_answered() { # container -> conveyor_chunk_latency_seconds_count on its /metrics
    docker exec "$1" python3 -c 'import urllib.request
text = urllib.request.urlopen("http://127.0.0.1:9100/metrics", timeout=5).read().decode()
print(sum(float(line.split()[-1]) for line in text.splitlines()
          if line.startswith("conveyor_chunk_latency_seconds_count")))'
}

predicts_french() { # conveyor stream output -> succeeds when "french" is among the last chunk's predictions
    local last
    last=$(grep -- '->' <<<"$1" | tail -n 1)
    grep -qw "french" <<<"${last#*->}"
}

check_scale_failover() {
    log "profile scale: replicas on Redis behind nginx; the one holding the story is killed mid-story"
    "${compose[@]}" -p "$project" "${files[@]}" --profile scale up -d || die "compose --profile scale up failed" \
        "$("${compose[@]}" -p "$project" "${files[@]}" --profile scale logs --tail=30 2>&1)"
    wait_healthy server-1
    wait_healthy server-2
    local session="story-$RANDOM" output owner="" replica id answered
    output=$(printf '%s' "i grew up in france ." | "$conveyor" stream --target 127.0.0.1:50052 \
        --session "$session" --keep --top 1 - 2>"$scratch/scale.err") ||
        die "the story's first sentence failed through nginx" "$output" "$(cat "$scratch/scale.err")"
    for replica in server-1 server-2; do
        id=$(container_of "$project" "$replica")
        answered=$(chunks_answered "$id")
        [[ "$answered" != 0.0 ]] && owner="$replica"
    done
    [[ -n "$owner" ]] || die "neither replica answered the story's first sentence"
    docker kill "$(container_of "$project" "$owner")" >/dev/null
    echo "ok: the story's session $session started on $owner; $owner killed (SIGKILL)"
    # The rest of the story (6 words in), through nginx: the survivor loads the session from Redis.
    output=$(printf '%s' "${story#i grew up in france . }" | "$conveyor" stream --target 127.0.0.1:50052 \
        --session "$session" --offset 6 --top 3 - 2>"$scratch/scale.err") ||
        die "the rest of the story failed after $owner was killed" "$output" "$(cat "$scratch/scale.err")"
    printf '%s\n' "$output"
    predicts_french "$output" || die "'french' is not predicted after the failover"
    echo "ok: 'french' predicted after 'i speak fluent', with $owner dead"
}

check_tls() {
    log "TLS: the server recreated with docker-compose.tls.yml and the certificates of scripts/make_tls_certs.sh"
    local tls="$scratch/tls" output
    scripts/make_tls_certs.sh "$tls" >/dev/null
    CONVEYOR_TLS_DIR="$tls" "${compose[@]}" -p "$project" "${files[@]}" "${tls_files[@]}" up -d server ||
        die "compose up with docker-compose.tls.yml failed" \
            "$("${compose[@]}" -p "$project" "${files[@]}" "${tls_files[@]}" logs --tail=30 tls-init server 2>&1)"
    wait_healthy # by the TLS file's health check, over TLS
    output=$(printf '%s' "$story" | "$conveyor" stream --target 127.0.0.1:50051 --ca "$tls/ca.pem" --top 3 - \
        2>"$scratch/tls.err") || die "conveyor stream --ca failed" "$output" "$(cat "$scratch/tls.err")"
    printf '%s\n' "$output"
    predicts_french "$output" || die "'french' is not predicted over TLS"
    echo "ok: 'french' predicted after 'i speak fluent', over TLS"
    if output=$(printf '%s' "$story" | "$conveyor" stream --target 127.0.0.1:50051 --top 1 - 2>&1); then
        die "a plaintext client was let in by the TLS server" "$output"
    fi
    echo "ok: a plaintext client is refused: ${output##*error: }"
}

prometheus_value() { # PromQL -> first sample's value, or nothing
    curl -fsS --max-time 5 --get --data-urlencode "query=$1" http://127.0.0.1:9090/api/v1/query 2>/dev/null |
        python3 -c 'import json, sys; r = json.load(sys.stdin)["data"]["result"]; print(r[0]["value"][1] if r else "")' \
            2>/dev/null || true
}

check_prometheus() {
    log "Prometheus scrapes the server and loaded the rules"
    local deadline=$(($(date +%s) + 120)) count=""
    while (($(date +%s) < deadline)); do
        count=$(prometheus_value 'sum(conveyor_chunk_latency_seconds_count{job="conveyor"})')
        [[ -n "$count" && "$count" != 0 ]] && break
        sleep 3
    done
    [[ -n "$count" && "$count" != 0 ]] || die "Prometheus has no conveyor_chunk_latency_seconds_count samples"
    [[ "$(prometheus_value 'up{job="conveyor"}')" == 1 ]] || die "Prometheus does not see the server up"
    local rules
    rules=$(curl -fsS --max-time 5 http://127.0.0.1:9090/api/v1/rules |
        python3 -c 'import json, sys; print(sum(len(g["rules"]) for g in json.load(sys.stdin)["data"]["groups"]))')
    ((rules > 0)) || die "Prometheus loaded no rules"
    echo "ok: conveyor_chunk_latency_seconds_count = $count, up = 1, $rules rules loaded"
}

ensure_tools
ensure_engine
scratch=$(mktemp -d)
[[ -x "$conveyor" ]] || die "$conveyor not found: run make setup first"
log "offline inputs: base image, wheelhouse, Prometheus image"
scripts/build_local_base.sh
scripts/fetch_wheelhouse.sh
scripts/build_local_prometheus.sh
log "building the trainer and server images"
"${compose[@]}" -p "$project" "${files[@]}" build trainer server
docker image ls --format '{{.Repository}}:{{.Tag}} {{.Size}}' | grep -E '^conveyor-(trainer|server):' || true

check_trainer_failure_blocks_server
check_server_refuses_bad_models

if [[ -n "${CONVEYOR_E2E_ARTIFACT:-}" ]]; then
    log "seeding the artifacts volume from $CONVEYOR_E2E_ARTIFACT: the trainer will skip training"
    seed=$(realpath "$CONVEYOR_E2E_ARTIFACT")
    [[ -f "$seed/model.onnx" ]] || die "$seed has no model.onnx"
    "${compose[@]}" -p "$project" "${files[@]}" run --rm --no-deps -v "$seed:/seed:ro" --entrypoint cp \
        trainer -r /seed /artifacts/language
fi
log "docker compose up -d (trainer, then server, prometheus)"
"${compose[@]}" -p "$project" "${files[@]}" up -d || die "compose up failed" \
    "$("${compose[@]}" -p "$project" "${files[@]}" logs --tail=30 trainer 2>&1)"
wait_healthy
check_trainer_ran_once
check_stream
check_prometheus
check_scale_failover
check_tls
