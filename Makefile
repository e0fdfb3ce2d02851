# Conveyor: `make demo` runs the story end to end, `make test` runs the checks. Both set up .venv first.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
SRC := modelcard training export serving tests scripts

.DEFAULT_GOAL := help
.PHONY: help setup demo demo-vad test services triton-client fuzz bench bench-triton e2e-compose lint typecheck proto proto-check train export experiment experiment-quick serve clean

help: ## List what you can do
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-18s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip setuptools wheel
	$(BIN)/pip install --quiet -e '.[train,data,dev]'
	touch $(STAMP)

setup: $(STAMP) ## Create .venv and install Conveyor with training and dev tools

demo: $(STAMP) ## Train + export the language model if missing, serve it, stream the France story through gRPC
	$(BIN)/conveyor demo

# silero VAD from its own wheel (a dev dependency), carded as a user would; speech spoken by espeak-ng.
VAD_MODEL := artifacts/silero-vad-16k
SPEECH := artifacts/speech-16k.wav

$(VAD_MODEL)/model.json: $(STAMP)
	$(BIN)/conveyor card "$$($(BIN)/python -c 'import silero_vad, pathlib; print(pathlib.Path(silero_vad.__file__).parent / "data" / "silero_vad.onnx")')" \
		--constant sr=16000 --window 512 --context 64 --state state:stateN \
		--labels speech --meaning "speech probability" --task vad --out $(VAD_MODEL)

$(SPEECH): $(STAMP) services
	$(BIN)/python -m serving.cli.speak $(SPEECH)

demo-vad: $(VAD_MODEL)/model.json $(SPEECH) ## silero VAD: stream 30 s of espeak-ng speech as a call would, print the segments
	$(BIN)/conveyor vad $(SPEECH) --model $(VAD_MODEL)

test: $(STAMP) services triton-client proto-check lint typecheck ## Run the test suite, ruff and mypy
	$(BIN)/pytest

# Tests start their own Prometheus (rule tests, dashboard queries), redis-server (durable sessions) and nginx
# (routing) on free loopback ports; espeak-ng and sox make the speech the VAD tests and demo stream. Debian
# packages them all.
services: ## Install Prometheus, redis-server, nginx, espeak-ng and sox from Debian when missing
	@missing=""; \
	for pair in promtool:prometheus redis-server:redis-server nginx:nginx espeak-ng:espeak-ng sox:sox; do \
		tool="$${pair%%:*}"; command -v "$$tool" >/dev/null || [ -x "/usr/sbin/$$tool" ] \
			|| missing="$$missing $${pair##*:}"; \
	done; \
	if [ -n "$$missing" ]; then \
		{ apt-get update -qq && apt-get install -y -qq $$missing >/dev/null; } \
			|| echo "could not install$$missing: the tests that need it will be skipped"; \
	fi

# Triton's own clients, to drive the Open Inference Protocol side as Triton's users would: tritonclient 2.51
# needs numpy<2 and protobuf<5, which .venv cannot have, so it lives in a venv of its own. Its wheel bundles
# perf_analyzer, a binary linked against libb64 (Debian) and libcudart.so.12 (the nvidia-cuda-runtime-cu12
# wheel; loaded even with no GPU): scripts/perf_analyzer.py finds both.
TRITON_VENV := .venv-triton
TRITON_STAMP := $(TRITON_VENV)/.installed
TRITON_PINS := 'tritonclient[grpc]==2.51.0' numpy==1.26.4 protobuf==4.25.9 grpcio==1.85.1 \
	nvidia-cuda-runtime-cu12==12.6.77

# Rebuilt when the Makefile changes, since the pins live here; pip makes a rerun cheap.
$(TRITON_STAMP): Makefile
	$(PYTHON) -m venv $(TRITON_VENV)
	$(TRITON_VENV)/bin/pip install --quiet --upgrade pip
	$(TRITON_VENV)/bin/pip install --quiet $(TRITON_PINS)
	touch $(TRITON_STAMP)

triton-client: $(TRITON_STAMP) ## Create .venv-triton (tritonclient, perf_analyzer) and install libb64 when missing
	@PATH="$$PATH:/sbin:/usr/sbin" ldconfig -p | grep -q 'libb64\.so\.0d' \
		|| { apt-get update -qq && apt-get install -y -qq libb64-0d >/dev/null; } \
		|| echo "could not install libb64-0d: perf_analyzer will not start (tritonclient still works)"

# The benchmark's model: the sensor task widened to 256 hidden units, the size the throughput targets were
# written for (ONNX Runtime: ~22k steps/s one row at a time, ~140k in batches of 64). Speed does not depend
# on the weights, so a short training run will do.
BENCH_MODEL := artifacts/sensor-h256

$(BENCH_MODEL)/model.onnx: $(STAMP)
	$(BIN)/conveyor train --task sensor --hidden-size 256 --max-steps 60 --out $(BENCH_MODEL)
	$(BIN)/conveyor export $(BENCH_MODEL)

bench: $(BENCH_MODEL)/model.onnx ## Quick benchmark of the 256-unit bench model: table, JSON + PNG under reports/bench/
	$(BIN)/conveyor bench --quick --model $(BENCH_MODEL) --json reports/bench/quick.json --plot reports/bench/quick.png

bench-triton: $(BENCH_MODEL)/model.onnx triton-client ## perf_analyzer (v2 unary, streaming) and the native bench against one server
	$(BIN)/python scripts/bench_triton.py --model $(BENCH_MODEL) --json reports/bench/triton/rows.json \
		--plot reports/bench/triton/rows.png | tee reports/bench/triton/rows.txt

e2e-compose: $(STAMP) ## Offline compose end to end: images, train, serve, stream the story, scrape (root; ~20 min cold)
	scripts/e2e_compose.sh

fuzz: $(STAMP) services ## The fuzzer and the contract's property test at 20x make test's cases, fresh each run
	CONVEYOR_FUZZ_SCALE=20 $(BIN)/pytest -p no:cacheprovider -o timeout=3600 --hypothesis-show-statistics \
		tests/test_request_fuzz.py tests/test_contract_property.py

lint: $(STAMP) ## ruff lint and format check
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP) ## mypy (strict)
	$(BIN)/mypy $(SRC)

proto: $(STAMP) ## Regenerate serving/_proto from protos/
	$(BIN)/python scripts/gen_protos.py

proto-check: $(STAMP) ## Fail if serving/_proto is stale
	$(BIN)/python scripts/gen_protos.py --check

train: $(STAMP) ## Train the language and sensor models into artifacts/
	$(BIN)/conveyor train --task language --out artifacts/language
	$(BIN)/conveyor train --task sensor --out artifacts/sensor

export: $(STAMP) ## Export artifacts/language and artifacts/sensor to ONNX (verified)
	$(BIN)/conveyor export artifacts/language
	$(BIN)/conveyor export artifacts/sensor

experiment: $(STAMP) ## The LSTM/GRU/RNN gap sweep: per-cell lr/clip search, G = 1-400 x 3 seeds (~65 min of one core)
	$(BIN)/conveyor experiment gap-sweep --out reports/gap_sweep

experiment-quick: $(STAMP) ## A reduced gap sweep: smaller search, G = 1-50, one seed (~4 min of one core)
	$(BIN)/conveyor experiment gap-sweep --quick --out reports/gap_sweep_quick

serve: $(STAMP) ## Serve artifacts/language on :50051 (metrics on :9100)
	$(BIN)/conveyor serve --model artifacts/language --port 50051 --metrics-port 9100

clean: ## Remove .venv, .venv-triton, caches and generated artifacts
	rm -rf $(VENV) $(TRITON_VENV) .mypy_cache .ruff_cache .pytest_cache artifacts
