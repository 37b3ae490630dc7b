#!/usr/bin/env bash
# gateway-pair.sh -- a meshbridge gateway pair for ../shared/bench/{tunnel,latency}.sh.
#   gateway-pair.sh ENTRY_PORT TUNNEL_PORT BACKEND_PORT [quic|tcp]   (or TRANSPORT=quic|tcp)
# The entry gateway listens for plaintext on 127.0.0.1:ENTRY_PORT (a fixed service listener
# for bench/backend) and tunnels each connection to the exit gateway at
# 127.0.0.1:TUNNEL_PORT (QUIC, or the TLS-over-TCP fallback) with mutual TLS (its own SPIFFE
# PKI, made here); the exit gateway forwards to 127.0.0.1:BACKEND_PORT. Static catalog
# file, no registry. Stays in the foreground; SIGTERM stops both.
# Optional: MB = the meshbridge binary (default target/dist/meshbridge: cargo build --profile dist).
# Optional: WORKERS = threads per gateway (default 1; 0 = one per CPU).
# Optional: MTU = the QUIC tunnel's max_mtu (default 8952; loopback carries up to 65527).
# Optional: TUNNEL_SETTINGS = more lines for both gateways' [gateway.tunnel] (TOML; \n
#   separates lines, e.g. 'stream_window_bytes = 33554432\nsocket_buffer_bytes = 16777216').
# Optional: ADMIN_ENTRY / ADMIN_EXIT = ip:port of each gateway's admin HTTP (/metrics).
set -euo pipefail
ENTRY=$1 TUNNEL=$2 BACKEND=$3 TRANSPORT=${4:-${TRANSPORT:-quic}}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
# The binary measured is the one gateways ship as (docs/OPERATIONS.md): the `dist` profile,
# whole-program LTO. MB=path overrides (e.g. target/release/meshbridge).
MB=${MB:-$ROOT/target/dist/meshbridge}
D=$(mktemp -d /tmp/bench-mbgw.XXXXXX)
trap 'kill $(jobs -p) 2>/dev/null; wait; rm -rf "$D"' EXIT
trap 'exit 0' TERM INT
"$MB" pki init --trust-domain bench.local --out "$D/ca" >/dev/null
for s in entry exit; do
  "$MB" pki issue --id "spiffe://bench.local/site/$s/gateway" --ca "$D/ca" --out "$D/$s" --ttl 2d >/dev/null
done
python3 - "$D/catalog.json" "$TUNNEL" "$BACKEND" <<'PY'
import json, sys
path, tunnel, backend = sys.argv[1], sys.argv[2], int(sys.argv[3])
def site(name, rev, gws):
    return {"name": name, "kind": "cluster", "locality": {"region": "bench", "zone": name},
            "gateways": gws, "lease_ttl_ms": 3600000, "grace_ms": 3600000,
            "last_heartbeat_ms": 0, "state": {"state": "fresh"}, "created_revision": rev}
cat = {"revision": 3,
       "sites": {"entry": site("entry", 1, ["127.0.0.1:1"]), "exit": site("exit", 2, [f"127.0.0.1:{tunnel}"])},
       "exports": [{"site": "exit", "service": {"namespace": "bench", "name": "backend"}, "generation": 1,
                    "ports": [{"name": "tcp", "port": 5201, "protocol": "TCP", "target_port": backend}],
                    "endpoints": [{"address": "127.0.0.1", "hostname": None, "ready": True, "weight": 1, "identity": None}],
                    "headless": False, "created_revision": 3, "updated_revision": 3}],
       "policies": {}, "tokens": {}}
json.dump(cat, open(path, "w"))
PY
gw() { # site listen extra [admin]
  cat > "$D/$1.toml" <<CFG
workers = ${WORKERS:-1}
[gateway]
site = "$1"
data_dir = "$D/$1-data"
${4:+admin_listen = \"$4\"}
[gateway.tunnel]
listen = "$2"
transport = "$TRANSPORT"
max_mtu = ${MTU:-8952}
$(printf '%b' "${TUNNEL_SETTINGS:-}")
$3
[tls]
cert = "$D/$1/cert.pem"
key = "$D/$1/key.pem"
bundle = "$D/$1/bundle.pem"
[source]
catalog_file = "$D/catalog.json"
CFG
}
gw exit "127.0.0.1:$TUNNEL" "" "${ADMIN_EXIT:-}"
gw entry "127.0.0.1:0" "[[gateway.listeners.fixed]]
listen = \"127.0.0.1:$ENTRY\"
service = \"bench/backend\"
port = 5201" "${ADMIN_ENTRY:-}"
MESHBRIDGE_LOG=warn "$MB" gateway --config "$D/exit.toml" &
MESHBRIDGE_LOG=warn "$MB" gateway --config "$D/entry.toml" &
wait
