#!/bin/bash
# bench/agent_idle.sh -- the VM agent's idle footprint (RSS and CPU over SECS, default 60 s).
#
# Release binary (cargo build --release), all on 127.0.0.1: a 1-node registry with ca_dir,
# a gateway site "east" exporting one service, and `meshbridge agent` for site "vm", joined
# with a token from `meshbridge ctl token create`, with one service (TCP check every 2 s)
# and its DNS stub. After WARMUP (10 s) it samples /proc every second.
#   LINK=1  first sends one request from the VM to east's service through the agent's VIP
#           (DNS stub → VIP listener → QUIC tunnel), so the idle link's keepalives count.
# Every process it starts is stopped at the end; its temp dir is removed.
set -euo pipefail
B=${B:-$(cd "$(dirname "$0")/.." && pwd)/target/release/meshbridge}
D=$(mktemp -d /tmp/mb-agent-bench.XXXX)
cd "$D"
export MESHBRIDGE_LOG=warn
$B pki init --trust-domain bench.example --out ca >/dev/null
$B pki issue --id spiffe://bench.example/registry/1 --ca ca --out reg >/dev/null
$B pki issue --id spiffe://bench.example/ctl/bench --ca ca --out ctl >/dev/null
$B pki issue --id spiffe://bench.example/site/east/gateway --ca ca --out east >/dev/null
port() { python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])'; }
RP=$(port); EP=$(port); FP=$(port)
cat > reg.toml <<T
node_id = 1
listen = "127.0.0.1:$RP"
admin_listen = "127.0.0.1:0"
data_dir = "$D/reg-data"
ca_dir = "$D/ca"
[tls]
cert = "$D/reg/cert.pem"
key = "$D/reg/key.pem"
bundle = "$D/reg/bundle.pem"
[initial_members]
1 = "https://127.0.0.1:$RP"
T
$B registry --config reg.toml > reg.out 2>&1 & RPID=$!
python3 -m http.server $EP --bind 127.0.0.1 >/dev/null 2>&1 & HPID=$!
python3 -m http.server $FP --bind 127.0.0.1 >/dev/null 2>&1 & FPID=$!
trap 'kill $RPID $HPID $FPID ${GPID:-} ${APID:-} 2>/dev/null || true; wait 2>/dev/null; rm -rf "$D"' EXIT
for i in $(seq 100); do grep -q "listening on" reg.out && break; sleep 0.1; done
cat > east.toml <<T
[gateway]
site = "east"
data_dir = "$D/east-data"
[gateway.tunnel]
listen = "127.0.0.1:0"
[gateway.listeners]
vip_range = "127.241.0.0/16"
[tls]
cert = "$D/east/cert.pem"
key = "$D/east/key.pem"
bundle = "$D/east/bundle.pem"
[source]
registry = ["https://127.0.0.1:$RP"]
[register]
[[exports]]
namespace = "shop"
name = "front"
ports = [{ name = "http", port = $FP }]
endpoints = [{ address = "127.0.0.1" }]
T
$B gateway --config east.toml > east.out 2>&1 & GPID=$!
TOKEN=$($B ctl --registry https://127.0.0.1:$RP --tls-dir ctl token create --site vm --ttl 10m 2>/dev/null)
cat > agent.toml <<T
site = "vm"
trust_domain = "bench.example"
registry = ["https://127.0.0.1:$RP"]
data_dir = "$D/vm"
join_token = "$TOKEN"
bundle = "$D/ca/ca.pem"
vip_range = "127.242.0.0/16"
[tunnel]
listen = "127.0.0.1:0"
[dns]
listen = "127.0.0.1:0"
[[services]]
namespace = "billing"
name = "invoices"
ports = [{ name = "http", port = $EP }]
[services.check]
kind = "tcp"
address = "127.0.0.1:$EP"
interval_ms = 2000
T
$B agent --config agent.toml > agent.out 2>&1 & APID=$!
for i in $(seq 300); do grep -q "listening on" agent.out && break; sleep 0.1; done
grep "listening on" agent.out
if [ -n "${LINK:-}" ]; then
  DNS=$(grep -o 'dns [0-9.:]*' agent.out | cut -d' ' -f2)
  for i in $(seq 100); do VIP=$(dig +short -p ${DNS##*:} @127.0.0.1 front.shop.svc.clusterset.local A); [ -n "$VIP" ] && break; sleep 0.2; done
  for i in $(seq 50); do curl -s -o /dev/null -w "through the tunnel: HTTP %{http_code}\n" http://$VIP:$FP/ && break; sleep 0.2; done
fi
sleep ${WARMUP:-10}
clk=$(getconf CLK_TCK)
read -r u0 s0 < <(awk '{print $14, $15}' /proc/$APID/stat)
t0=$(date +%s.%N)
max=0; sum=0; n=0
for i in $(seq ${SECS:-60}); do
  r=$(awk '/VmRSS/{print $2}' /proc/$APID/status); sum=$((sum+r)); n=$((n+1)); [ $r -gt $max ] && max=$r
  sleep 1
done
read -r u1 s1 < <(awk '{print $14, $15}' /proc/$APID/stat)
t1=$(date +%s.%N)
# Where the resident memory is, mapping by mapping (over 256 kB), for the record.
awk '/^[0-9a-f]+-[0-9a-f]+ /{m=$2" "$6} /^Rss:/{if ($2>256) print "  rss " $2 " kB  " m}' /proc/$APID/smaps >&2
threads=$(awk "/Threads/{print \$2}" /proc/$APID/status); grep -E "RssAnon|RssFile|VmRSS" /proc/$APID/status; grep -E "^(Pss|Private_Clean|Private_Dirty|Shared_Clean|Anonymous):" /proc/$APID/smaps_rollup
python3 - <<P
ticks = ($u1 + $s1) - ($u0 + $s0)
secs = $t1 - $t0
print(f"agent idle over {secs:.0f} s: RSS avg {$sum/$n/1024:.1f} MiB, max {$max/1024:.1f} MiB; CPU {ticks/$clk:.2f} s = {100*ticks/$clk/secs:.2f} % of one core; threads $threads")
P
