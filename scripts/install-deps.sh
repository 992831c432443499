#!/usr/bin/env bash
# Installs the system packages ferry's build, tests and demo need, and only
# those that are missing. Safe to run again; used by `make demo` and `make test`.
set -euo pipefail

packages=(
  clang-19 llvm-19        # compiles the eBPF datapath (bpf/*.bpf.c)
  libbpf-dev libelf-dev zlib1g-dev pkg-config  # libbpf-rs / libbpf-sys build
  bpftool                 # inspecting programs and maps (ferry status, debugging)
  iproute2                # ip/tc for the network-namespace sandbox
  util-linux              # nsenter
  nftables                # the nftables datapath and masquerade fallback
  conntrack               # conntrack-tools: cross-checks in tests and benchmarks
  iptables                # iptables-nft-restore: kube-proxy's iptables rule layout, the peer in bench/ control_plane
)

missing=()
for p in "${packages[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done

if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "ferry: missing packages: ${missing[*]}; run as root (or: sudo apt-get install ${missing[*]})" >&2
    exit 1
  fi
  echo "ferry: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

for tool in cargo rustc; do
  command -v "$tool" >/dev/null || { echo "ferry: $tool not found; install Rust (rustup) first" >&2; exit 1; }
done
for comp in clippy rustfmt; do
  if ! cargo "${comp/rustfmt/fmt}" --version >/dev/null 2>&1; then
    rustup component add "$comp"
  fi
done
