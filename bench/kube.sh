#!/bin/bash
# bench/kube.sh -- the Kubernetes adapter: change latency (east EndpointSlice -> registry ->
# west's imported EndpointSlice -> meshbridge dns), initial sync of many exported Services,
# adapter RSS. Real kube-apiservers + etcd (tools/build.sh builds them once), the release
# binary for every meshbridge process, all on 127.0.0.1. See examples/kube_bench.rs.
#   CHANGES=200 SERVICES=10000 RSS_SERVICES=1000 bench/kube.sh
set -euo pipefail
cd "$(dirname "$0")/.."
tools/build.sh kube-apiserver
tools/build.sh etcd
cargo build --release --quiet
cargo build --release --quiet --example kube_bench
# The example runs the binary the tests use (CARGO_BIN_EXE_meshbridge of its profile).
MESHBRIDGE_LOG=warn exec target/release/examples/kube_bench
