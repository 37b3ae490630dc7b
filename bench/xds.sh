#!/usr/bin/env bash
# xds.sh -- xDS push latency to a real Envoy (tools/envoy.sh): a gateway serving N services
# of its own site; each round changes one service's endpoints and times until Envoy ACKs
# the endpoint response carrying it (then checks Envoy's membership stat). State of the
# world and incremental (delta) ADS, interleaved, RUNS rounds each.
#   cargo build --release -p meshbridge-gateway --example xds_bench && bench/xds.sh
# Env: RUNS=3, SERVICES=1000, ROUNDS=200; FANOUT=1 adds 100 Envoys on 100 services (a change
# is applied when all 100 have ACKed it; the gateway's memory with all of them connected).
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
BIN=$HERE/../target/release/examples/xds_bench
[ -x "$BIN" ] || { echo "build first: cargo build --release -p meshbridge-gateway --example xds_bench" >&2; exit 1; }
MESHBRIDGE_ENVOY=${MESHBRIDGE_ENVOY:-$("$HERE/../tools/envoy.sh")}
export MESHBRIDGE_ENVOY
for r in $(seq "${RUNS:-3}"); do
  for delta in 0 1; do
    DELTA=$delta timeout 600 "$BIN" "${SERVICES:-1000}" "${ROUNDS:-200}" | sed "s/^/[round $r] /"
  done
done
if [ "${FANOUT:-0}" != 0 ]; then
  for delta in 0 1; do
    DELTA=$delta ENVOYS=100 timeout 900 "$BIN" 100 50 | sed "s/^/[fan-out] /"
  done
fi
