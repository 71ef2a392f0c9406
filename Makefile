# The two commands a newcomer needs:
#   make demo   - set up .venv and run the whole pipeline on a small generated dataset (no servers needed)
#   make test   - set up .venv and run the test suite (starts its own SeaweedFS / MLflow / Prefect on 127.0.0.1)
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup demo test test-fast test-clusters bench clean stack-up stack-down stack-status gpu-kit image

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip setuptools wheel
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

demo: $(STAMP)
	$(BIN)/dino demo

# Two pytest workers, one test file each at a time: the end-to-end tests mostly wait on servers and subprocesses.
# The tests of a real Slurm cluster and of the trainer image (marked `cluster`, 10-15 minutes more) run in
# `make test-clusters`; CI (.ci/run) runs both.
test: $(STAMP)
	$(BIN)/python -m pytest -n 2 --dist loadfile -m "not cluster" --durations=15

test-clusters: $(STAMP)
	$(BIN)/python -m pytest -n 2 --dist loadfile -m cluster --durations=15

test-fast: $(STAMP)
	$(BIN)/python -m pytest -n 2 --dist loadfile -m "not slow and not cluster"

bench: $(STAMP)
	$(BIN)/python benchmarks/shard_throughput.py

clean:
	rm -rf $(VENV) .demo .pytest_cache

# The local stack for the operator guide (docs/operator-guide.md): Prefect, MLflow, SeaweedFS and a worker on 127.0.0.1.
stack-up: $(STAMP)
	$(BIN)/python -m infra.stack up

stack-down:
	$(BIN)/python -m infra.stack down

stack-status:
	$(BIN)/python -m infra.stack status

# The trainer image (infra/docker/Dockerfile) with Podman on a Debian base made here, no registry needed
# (docs/operator-guide.md, "Building the image"): localhost/dino-pipeline:<version>.
image: $(STAMP)
	$(BIN)/python -m infra.image.build --base debian

# What a lent GPU machine needs for benchmarks/gpu_session.sh (issue 7): the wheels its image lacks and, when
# SAMPLE_JPEGS names a folder of real photographs, a copy of it, in git-ignored folders that the device tool carries
# (carry: [".whl", ".gpu-data"]). Without one, benchmarks/speed.py generates its JPEGs.
#   make gpu-kit SAMPLE_JPEGS=/data/imagenet-sample
SAMPLE_JPEGS ?=
gpu-kit:
	rm -rf .whl && mkdir -p .whl .gpu-data
	$(PYTHON) -m pip download --quiet --no-deps --only-binary=:all: -d .whl \
		webdataset==1.0.2 braceexpand==0.1.7 timm==1.0.31
	@if [ -n "$(SAMPLE_JPEGS)" ]; then test -d "$(SAMPLE_JPEGS)" || { echo "SAMPLE_JPEGS=$(SAMPLE_JPEGS) is not a folder" >&2; exit 2; }; \
		rm -rf .gpu-data/imagenet-sample; cp -r "$(SAMPLE_JPEGS)" .gpu-data/imagenet-sample; fi
	@du -sh .whl .gpu-data
