# Bowline's entry points. Builds are cached outside the clone, under
# $(BOWLINE_CACHE): the Go module and build caches, the local cluster's
# binaries, and Cargo's target directory.

BOWLINE_CACHE ?= $(HOME)/.cache/bowline
CARGO_TARGET_DIR ?= $(BOWLINE_CACHE)/target
export BOWLINE_CACHE CARGO_TARGET_DIR

CARGO ?= cargo

.PHONY: demo cluster test lint k8s envoy kstatus helm prometheus jaeger olm-validate olm descriptors deps proxy-pgo bench-operator bench-controlplane bench-proxy bench-mtls bench-instructions

## demo: the local cluster with the node agent (pods really run; needs
## root), the operator from its Helm chart, the demo mesh, the sample app
## split 90/10, traffic through the ingress gateway, a canary upgrade; stop.
demo: k8s helm prometheus jaeger
	$(CARGO) build --locked -q -p bowline-controlplane -p bowline-proxy -p bowline-operator -p bowline-tests --bins
	$(CARGO) run --locked -q -p bowline-tests --bin bowline-cluster -- --demo

## cluster: bring the local cluster up and keep it until Ctrl-C.
cluster: k8s
	$(CARGO) run --locked -q -p bowline-tests --bin bowline-cluster

## test: formatting, clippy (warnings are errors), then every test.
test: lint k8s envoy kstatus helm prometheus jaeger olm-validate
	$(CARGO) test --locked --workspace

lint: deps
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --locked --workspace --all-targets -- -D warnings

## bench-operator: time a demo install, count API requests, measure memory.
bench-operator: k8s
	$(CARGO) build --locked --release -p bowline-operator
	$(CARGO) run --locked --release -q -p bowline-tests --bin bench-operator -- \
		--operator $(CARGO_TARGET_DIR)/release/bowline-operator

## bench-controlplane: 1,000 services, 10,000 endpoints, 1,000 proxies on
## delta ADS: convergence after a change, CPU per push, memory per proxy.
bench-controlplane: deps
	$(CARGO) run --locked --release -q -p bowline-tests --bin bench-controlplane

## proxy-pgo: bowline-proxy as released, optimised by its profile: an
## instrumented build serves the benchmarks' loads (`bench-proxy --suite
## train`: HTTP/1.1, HTTP/2, mutual TLS between sidecars), LLVM merges what
## it recorded, and the release build is laid out by it. The binary is
## $(PROXY) (apt-get install wrk nghttp2-client nginx-light).
HOST_TRIPLE := $(shell rustc -vV 2>/dev/null | sed -n 's/^host: //p')
PGO_DIR = $(CARGO_TARGET_DIR)/pgo
PGO_TRAINEE = $(PGO_DIR)/target/$(HOST_TRIPLE)/release/bowline-proxy
PROXY = $(CARGO_TARGET_DIR)/$(HOST_TRIPLE)/release/bowline-proxy
proxy-pgo:
	@rustup component list --installed | grep -q '^llvm-tools' || rustup component add llvm-tools
	$(CARGO) build --locked --release -p bowline-tests --bin bench-proxy
	RUSTFLAGS="-Cprofile-generate=$(PGO_DIR)/profiles" $(CARGO) build --locked --release \
		-p bowline-proxy --bin bowline-proxy --target $(HOST_TRIPLE) --target-dir $(PGO_DIR)/target
	$(MAKE) --no-print-directory $(PGO_DIR)/bowline-proxy.profdata
	RUSTFLAGS="-Cprofile-use=$(PGO_DIR)/bowline-proxy.profdata" $(CARGO) build --locked --release \
		-p bowline-proxy --bin bowline-proxy --target $(HOST_TRIPLE)

# The profile: recorded again only when the instrumented build changed.
$(PGO_DIR)/bowline-proxy.profdata: $(PGO_TRAINEE)
	rm -rf $(PGO_DIR)/profiles
	$(CARGO_TARGET_DIR)/release/bench-proxy --suite train --seconds 2 --proxy-core $$(($$(nproc) - 1)) \
		--proxy $(PGO_TRAINEE)
	"$$(rustc --print sysroot)/lib/rustlib/$(HOST_TRIPLE)/bin/llvm-profdata" merge -o $@ $(PGO_DIR)/profiles

## bench-proxy: bowline-proxy as released (proxy-pgo) beside Envoy, nginx
## and HAProxy on loopback (apt-get install wrk nghttp2-client nginx-light
## haproxy).
bench-proxy: envoy proxy-pgo
	taskset -c 0 $(CARGO_TARGET_DIR)/release/bench-proxy --proxy $(PROXY) $(BENCH_ARGS)

## bench-mtls: two bowline-proxy sidecars in a row, plaintext and then
## mutual TLS between them: added latency, CPU, handshakes per second.
bench-mtls: proxy-pgo
	taskset -c 0 $(CARGO_TARGET_DIR)/release/bench-proxy --proxy $(PROXY) --suite mtls $(BENCH_ARGS)

## bench-instructions: instructions per HTTP/1.1 request of bowline-proxy
## and of nginx as the same proxy, counted by valgrind's callgrind
## (apt-get install valgrind nghttp2-client nginx-light).
bench-instructions: proxy-pgo
	taskset -c 0 $(CARGO_TARGET_DIR)/release/bench-proxy --proxy $(PROXY) --suite instructions $(BENCH_ARGS)

## k8s: build (or find, when up to date) the local cluster's binaries.
k8s: deps
	bash tests/k8s/build.sh

## envoy: fetch (once) the Envoy binary the tests run as a proxy.
envoy:
	bash tests/envoy/fetch.sh

## kstatus: build the kstatus checker GitOps health is tested with.
kstatus: deps
	bash tests/kstatus/build.sh

## helm: build helm (pinned, from its Go module) for the chart's tests.
helm: deps
	bash tests/helm/build.sh

## prometheus: build Prometheus (pinned, from its Go module, with the
## Kubernetes discovery Debian's lacks) for the mesh's Prometheus addon.
prometheus: deps
	bash tests/prometheus/build.sh

## jaeger: build Jaeger's all-in-one (pinned, from its Go module) for the
## mesh's Jaeger addon.
jaeger: deps
	bash tests/jaeger/build.sh

## olm-validate: build the operator framework's bundle validator.
olm-validate: deps
	bash tests/olm/build.sh

## olm: write the operator's OLM bundle (config/olm/) from the chart, RBAC,
## CRDs and samples; commit the result.
olm: helm
	$(CARGO) run --locked -q -p bowline-tests --bin olm-bundle

## descriptors: write the Envoy API descriptors the proxy decodes its
## configuration files with (proxy/src/envoy.binpb); commit the result.
descriptors: deps
	"$$(bash proxy/descriptors/build.sh)" > proxy/src/envoy.binpb

## deps: what the builds need besides cargo and go.
deps:
	@command -v go >/dev/null || { echo "Go 1.24 or newer is required (https://go.dev/dl/)"; exit 1; }
	@command -v cargo >/dev/null || { echo "Rust is required (https://rustup.rs)"; exit 1; }
	@$(CARGO) fmt --version >/dev/null 2>&1 || rustup component add rustfmt
	@$(CARGO) clippy --version >/dev/null 2>&1 || rustup component add clippy
