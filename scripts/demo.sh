#!/usr/bin/env bash
# `make demo`: ferry live in a sandbox of network namespaces (`ferry demo`),
# then what `ferry explain` makes of the bundled example cluster (examples/).
set -euo pipefail
ferry=${1:-target/debug/ferry}
ex=examples
say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

if [ "$(id -u)" -ne 0 ]; then
	echo "make demo builds network namespaces and loads BPF programs: run it as root (sudo make demo)." >&2
	exit 1
fi

say "Live: a sandbox node, a Service with three pods, the eBPF datapath"
"$ferry" demo --datapath bpf

say "The same Service on the nftables datapath (for hosts where BPF is not allowed)"
"$ferry" demo --datapath nftables --connections 30

say "ferry explain on examples/: a pod resolves DNS through the ClusterIP"
"$ferry" explain --manifests $ex/manifests --node-config $ex/node.yaml --from 10.244.1.5 --to 10.96.0.10:53/UDP

say "An outside client reaches the storefront LoadBalancer (externalTrafficPolicy Local, allowed source range)"
"$ferry" explain --manifests $ex/manifests --node-config $ex/node.yaml --from 198.51.100.7 --to 203.0.113.80:443

say "The same LoadBalancer from a client outside loadBalancerSourceRanges"
"$ferry" explain --manifests $ex/manifests --node-config $ex/node.yaml --from 192.0.2.7 --to 203.0.113.80:443

say "kube-proxy's behaviour, flow by flow (acceptance/kube-proxy-flows.json, model datapath)"
"$ferry" conformance --cases acceptance/kube-proxy-flows.json --datapath model | tail -1
