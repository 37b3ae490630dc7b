#!/usr/bin/env bash
# dns.sh -- meshbridge's federated DNS beside Knot and CoreDNS, interleaved run by run:
# each of RUNS rounds runs ../shared/bench/dns.sh once for Knot, once for meshbridge (the
# federation crate's dns_bench example: the same 10,000 names from a catalog, rate limit
# off) and once for CoreDNS (built from its Go module by tools/build.sh, `file` plugin on
# the same zone file), so all see the same background load.
#   cargo build --release -p meshbridge-federation --example dns_bench && bench/dns.sh
# Env: RUNS=3 (rounds), DURATION=10, COREDNS=0 to leave CoreDNS out, CHURN=1 to add
# meshbridge while its whole index is rebuilt every 100 ms (CHURN_MS=100). Then the
# change-to-answer latency (CHANGE_LATENCY=200).
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
SHARED=${SHARED:-$HERE/../../shared/bench}
BIN=$HERE/../target/release/examples/dns_bench
[ -x "$BIN" ] || { echo "build first: cargo build --release -p meshbridge-federation --example dns_bench" >&2; exit 1; }
# Only the last step measures change latency; the servers under load must not inherit it.
CHANGE_ROUNDS=${CHANGE_LATENCY:-200}
unset CHANGE_LATENCY
COREDNS_BIN=""
if [ "${COREDNS:-1}" != 0 ]; then
  "$HERE/../tools/build.sh" coredns >&2
  COREDNS_BIN=$(ls "$HERE"/../target/tools/coredns/*/coredns | tail -1)
fi
for r in $(seq "${RUNS:-3}"); do
  RUNS=1 bash "$SHARED/dns.sh" 2>&1 | sed "s/^/[round $r knot] /"
  RUNS=1 SERVER_CMD="exec $BIN 127.0.0.1:\$DNS_PORT 10000" bash "$SHARED/dns.sh" 2>&1 | sed "s/^/[round $r meshbridge] /"
  if [ "${CHURN:-0}" != 0 ]; then
    # The same, while the whole index is rebuilt every 100 ms (a catalog change each time).
    # The churning server keeps a core busy by design: no waiting for a quiet machine.
    QUIET_MAX=0 RUNS=1 SERVER_CMD="CHURN_MS=100 exec $BIN 127.0.0.1:\$DNS_PORT 10000" bash "$SHARED/dns.sh" 2>&1 | sed "s/^/[round $r meshbridge-churn] /"
  fi
  if [ -n "$COREDNS_BIN" ]; then
    # The same zone file, served by CoreDNS's `file` plugin (one process, GOMAXPROCS = CPUs).
    RUNS=1 SERVER_CMD="printf 'clusterset.local:%s {\\n  bind 127.0.0.1\\n  file %s\\n}\\n' \$DNS_PORT \$ZONEFILE > \$ZONEFILE.Corefile && exec $COREDNS_BIN -conf \$ZONEFILE.Corefile" \
      bash "$SHARED/dns.sh" 2>&1 | sed "s/^/[round $r coredns] /"
  fi
done
CHANGE_LATENCY=$CHANGE_ROUNDS timeout 30 "$BIN" 127.0.0.1:0 10000 || true
