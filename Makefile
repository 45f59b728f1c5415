# herd: `make run` starts the whole mesh with a local etcd; `make test` runs every check and test.

SHELL := /bin/bash
PY_SCRIPTS := $(shell python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))' 2>/dev/null)
export PATH := $(PY_SCRIPTS):$(PATH)
CARGO ?= cargo

.PHONY: deps build run test lint fmt-check clippy buf-lint dockerfile-lint k8s-lint metrics-lint dup-check bench bench-scale clean

deps:
	@scripts/install-deps.sh

build: deps
	$(CARGO) build --workspace --bins

ETCD_MEMBERS ?= 1

run: build
	ETCD_MEMBERS=$(ETCD_MEMBERS) deploy/local/run.sh

fmt-check:
	$(CARGO) fmt --all -- --check

clippy: deps
	$(CARGO) clippy --workspace --all-targets -- -D warnings

buf-lint: deps
	buf lint

dockerfile-lint: deps
	hadolint deploy/docker/Dockerfile

# Offline: kubernetes-validate's bundled schemas for a named Kubernetes version, and checkov
# (skipped checks and why: deploy/k8s/.checkov.yaml).
K8S_VERSION ?= 1.31.0
k8s-lint: deps
	kubernetes-validate --strict --quiet -k $(K8S_VERSION) deploy/k8s/*.yaml
	checkov --config-file deploy/k8s/.checkov.yaml

# The scrape configuration with Prometheus' own checker; the Grafana dashboard is JSON (its
# queries run against a real Prometheus in the metrics test).
metrics-lint: deps
	promtool check config deploy/prometheus/prometheus.yml
	python3 -m json.tool deploy/grafana/herd-golden-signals.json >/dev/null

dup-check:
	scripts/check-duplicates.sh

lint: fmt-check clippy buf-lint dockerfile-lint k8s-lint metrics-lint dup-check

test: deps lint build
	@mkdir -p .run
	set -o pipefail; timeout 1500 $(CARGO) test --workspace 2>&1 | tee .run/test.log
	@awk '/^test result:/ { p += $$4; f += $$6 } END { printf "summary: %d passed, %d failed\n", p, f }' .run/test.log

bench: deps
	scripts/install-deps.sh bench
	scripts/bench.sh
	scripts/bench-mesh.sh
	scripts/bench-instructions.sh

# N simulated instances (100, 300, 1000) and subsetting callers against etcd of one and of three
# members: BENCHMARKS.md's scale figures, bench/scale.dat and docs/scale.svg.
bench-scale: deps
	scripts/install-deps.sh bench
	scripts/bench-scale.sh

clean:
	$(CARGO) clean
	rm -rf .run
