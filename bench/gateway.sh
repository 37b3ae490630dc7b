#!/usr/bin/env bash
# gateway.sh -- the meshbridge gateway pair beside direct TCP, stunnel, haproxy and Envoy, measured
# by ../shared/bench/tunnel.sh (iperf3 throughput) and latency.sh (wrk), in one invocation
# per transport so the peers are measured in the same run (runs interleaved).
#   bench/gateway.sh            Env: RUNS=3 TRANSPORTS="quic tcp" TESTS="tunnel latency"
# PEERS: the peers beside meshbridge (default "stunnel haproxy envoy"; direct TCP is added to
# the first transport's run). Envoy 1.40 is the one tools/envoy.sh installs (ENVOY=path overrides).
# The gateway binary: MB (default target/dist/meshbridge, the shipped profile).
# Also: gateway RSS idle and with 10,000 open connections, CPU seconds per Gbit/s.
# Results: ../shared/bench's TSVs in /tmp/bench/results; summaries on stdout.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
SHARED=${SHARED:-$HERE/../../shared/bench}
TRANSPORTS=${TRANSPORTS:-quic tcp}
TESTS=${TESTS:-tunnel latency rss}
want() { [[ " $TESTS " == *" $1 "* ]]; }
export MB=${MB:-$HERE/../target/dist/meshbridge}   # what gateways ship as (docs/OPERATIONS.md)
[ -x "$MB" ] || { echo "build first: cargo build --profile dist -p meshbridge (or set MB=binary)" >&2; exit 1; }
[ -f /tmp/bench/pki/ca.crt ] || bash "$SHARED/pki.sh"
PEERS=${PEERS:-stunnel haproxy envoy}
if [[ " $PEERS " == *" envoy "* ]]; then
  export ENVOY=${ENVOY:-$HERE/../target/tools/envoy/1.40.0-grpcio-1.85.4/envoy}
  [ -x "$ENVOY" ] || { echo "no Envoy at $ENVOY: run tools/envoy.sh (or set ENVOY, or PEERS without envoy)" >&2; exit 1; }
fi
first=1
for t in $TRANSPORTS; do
  peers="$PEERS"; [ $first = 1 ] && peers="direct $PEERS"
  proto=udp; [ "$t" = tcp ] && proto=tcp
  cmd="bash $HERE/gateway-pair.sh {ENTRY_PORT} {TUNNEL_PORT} {BACKEND_PORT} $t"
  want tunnel && CUSTOM_NAME="meshbridge-$t" TUNNEL_PROTO=$proto bash "$SHARED/tunnel.sh" $peers custom -- "$cmd"
  want latency && CUSTOM_NAME="meshbridge-$t" TUNNEL_PROTO=$proto bash "$SHARED/latency.sh" $peers custom -- "$cmd"
  first=0
done
if want rss; then
  python3 "$HERE/gateway_rss.py" "$HERE/gateway-pair.sh"
fi
