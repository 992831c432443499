# ferry's two commands: `make demo` and `make test`. Both install missing
# system packages first (scripts/install-deps.sh).

CARGO ?= cargo
FERRY := target/debug/ferry

.PHONY: demo test deps build lint clean-sandbox disruption

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
	$(FERRY) conformance --scenarios acceptance/kube-proxy-scenarios.json --datapath model
	$(FERRY) conformance --scenarios acceptance/ferry-scenarios.json --datapath model
	$(FERRY) conformance --cases acceptance/ferry-isolation-flows.json --datapath model

# The disruption suite, long form (needs root; `make test` runs 4 rounds of it):
# the agent SIGKILLed during changing syncs under load, 40 rounds; the seed is
# printed, FERRY_DISRUPTION_SEED=<seed> replays one run. The measured steps
# (SIGKILL + restart, endpoint rollout, node-config change, 2,000 endpoint
# changes in 10 s, and on bpf a downgrade to layout 1 and the upgrade back;
# ROUNDS/4 of each) on both datapaths, and a 30 s API server
# outage under `ferry agent` on both, measured into bench/results/disruption.md
# (written by the run, not by hand).
DISRUPTION_ROUNDS ?= 40
disruption: build
	FERRY_DISRUPTION_ROUNDS=$(DISRUPTION_ROUNDS) FERRY_DISRUPTION_RESULTS=$(CURDIR)/bench/results/disruption.md \
		$(CARGO) test -p ferry --test disruption -- --nocapture --test-threads 1

# The benchmarks (bench/README.md). Need root; not part of `make test`.
# socket_lb: socket-LB latency, programming time and memory at 1k, 10k and 100k
# services. nodeport: NodePort latency and rates on the BPF and nftables datapaths.
# reconcile: the conntrack reconciler at 100k and 1M entries against the conntrack
# tool (raises the global net.netfilter.nf_conntrack_max for the run, then restores it).
# control_plane: full-sync and one-change time of ferry's nftables datapath against
# kube-proxy's iptables and nftables rule layouts, same services, same run.
# tcx_cost: per-packet cost of the tcx programs by packet kind (BPF_PROG_TEST_RUN).
# control_plane_bpf: the incremental control plane on the eBPF datapath (in-process
# and through `ferry run`), time and memory.
.PHONY: bench bench-build bench-nodeport bench-reconcile bench-control-plane bench-control-plane-bpf
bench-build: deps
	$(CARGO) build --release -p ferry -p ferry-bench --bins

bench: bench-build
	target/release/socket_lb
	target/release/nodeport
	target/release/reconcile
	target/release/control_plane_bpf
	target/release/control_plane
	target/release/tcx_cost

bench-control-plane: bench-build
	target/release/control_plane

bench-control-plane-bpf: bench-build
	target/release/control_plane_bpf

bench-nodeport: bench-build
	target/release/nodeport

bench-reconcile: bench-build
	target/release/reconcile

# Longer fuzzing runs of the property tests that feed ferry arbitrary and
# mutated input (fuzz/README.md); `make test` runs them with proptest's default.
.PHONY: fuzz
fuzz: deps
	PROPTEST_CASES=200000 $(CARGO) test -p ferry-k8s --test fuzz_manifests
	PROPTEST_CASES=200000 $(CARGO) test -p ferry --test fuzz_config
	PROPTEST_CASES=200000 $(CARGO) test -p ferry-conntrack --test fuzz_wire
	PROPTEST_CASES=200000 $(CARGO) test -p ferry-model --test never_panics
