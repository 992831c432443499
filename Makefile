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
