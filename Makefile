# ferry's two commands: `make demo` and `make test`. Both install missing
# system packages first (scripts/install-deps.sh).

CARGO ?= cargo
FERRY := target/debug/ferry

.PHONY: demo test deps build lint clean-sandbox

deps:
	@scripts/install-deps.sh

build: deps
	$(CARGO) build --workspace --all-targets

demo: build
	@scripts/demo.sh $(FERRY)

lint: deps
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

test: lint build
	$(CARGO) test --workspace --no-fail-fast
	$(FERRY) conformance --cases acceptance/kube-proxy-flows.json --datapath model

# The socket-LB benchmark (bench/README.md): latency, programming time and
# memory at 1k, 10k and 100k services. Needs root; not part of `make test`.
.PHONY: bench
bench: deps
	$(CARGO) build --release -p ferry -p ferry-bench --bins
	target/release/socket_lb
