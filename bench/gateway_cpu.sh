#!/usr/bin/env bash
# gateway_cpu.sh -- where the CPU goes when one TCP stream crosses a meshbridge gateway pair:
# for each variant, start bench/gateway-pair.sh, send BYTES (default 2G) with iperf3 RUNS
# times (default 3), and print the throughput and the CPU time (user + system, from
# /proc/<pid>/stat) that each gateway, the iperf3 client and the iperf3 server spent on it.
# Variants alternate (ROUNDS times, default 3), so they see the same background load.
#   bench/gateway_cpu.sh VARIANT...
# A variant is a list of KEY=VALUE settings for gateway-pair.sh, separated by spaces, e.g.
#   bench/gateway_cpu.sh 'MTU=8952' 'MTU=65527'
#   bench/gateway_cpu.sh 'MB=/tmp/mb-a' 'MB=/tmp/mb-b'
#   bench/gateway_cpu.sh 'TRANSPORT=quic' 'TRANSPORT=tcp'
#   bench/gateway_cpu.sh 'TUNNEL_SETTINGS=keepalive_ms=1000' 'TUNNEL_SETTINGS=stream_window_bytes=33554432'
# The variant 'PEER=envoy' measures ../shared/bench's Envoy pair instead (ENVOY as in gateway.sh).
# Loopback only (ports 17000, 17443, 17201 on 127.0.0.1). Needs iperf3.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
SHARED=${SHARED:-$HERE/../../shared/bench}
export ENVOY=${ENVOY:-$HERE/../target/tools/envoy/1.40.0-grpcio-1.85.4/envoy}
BYTES=${BYTES:-2G} RUNS=${RUNS:-3} ROUNDS=${ROUNDS:-3}
ENTRY=17000 TUNNEL=17443 BACKEND=17201
[ $# -gt 0 ] || { sed -n 2,14p "$0" >&2; exit 2; }
command -v iperf3 >/dev/null || { echo "iperf3 not installed" >&2; exit 1; }
listening() { ss -Hltn "sport = :$1" | grep -q .; }
listening $BACKEND && { echo "port $BACKEND busy" >&2; exit 1; }
iperf3 -s -B 127.0.0.1 -p $BACKEND >/dev/null 2>&1 & SERVER=$!
PAIR=""
cleanup() { [ -n "$PAIR" ] && kill -- -"$PAIR" 2>/dev/null; kill $SERVER 2>/dev/null; wait 2>/dev/null || true; }
trap cleanup EXIT
for _ in $(seq 50); do listening $BACKEND && break; sleep 0.1; done
ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }   # utime + stime, 1/100 s
secs() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", (b - a) / 100 }'; }
printf 'variant\tround.run\tGbit/s\tentry_cpu_s\texit_cpu_s\tclient_cpu_s\tserver_cpu_s\n'
for round in $(seq "$ROUNDS"); do
  for v in "$@"; do
    read -r -a settings <<< "$v"
    if [ "$v" = PEER=envoy ]; then
      # The shared harness's Envoy pair (its own PKI), in port slot 0 = our ports.
      setsid env ENTRY_PORT=$ENTRY TUNNEL_PORT=$TUNNEL BACKEND_PORT=$BACKEND bash -c \
        "source '$SHARED/common.sh'; source '$SHARED/paths.sh'; path_start envoy; wait" >/dev/null 2>&1 &
      gateway_pattern='envoy/(exit|entry)\.yaml'
    else
      env "${settings[@]}" setsid bash "$HERE/gateway-pair.sh" $ENTRY $TUNNEL $BACKEND >/dev/null 2>&1 &
      gateway_pattern=' gateway --config '
    fi
    PAIR=$!
    for _ in $(seq 300); do listening $ENTRY && break; sleep 0.1; done
    listening $ENTRY || { echo "variant '$v': the gateway pair did not start" >&2; exit 1; }
    # Both pairs start the exit gateway first, then the entry gateway.
    mapfile -t pids < <(pgrep -f -- "$gateway_pattern" | sort -n)
    [ ${#pids[@]} = 2 ] || { echo "variant '$v': expected 2 gateways, found ${#pids[@]}" >&2; exit 1; }
    exit_pid=${pids[0]} entry_pid=${pids[1]}
    for r in $(seq "$RUNS"); do
      e0=$(ticks "$entry_pid") x0=$(ticks "$exit_pid") s0=$(ticks $SERVER)
      json=$(/usr/bin/time -f '%U %S' -o /tmp/gateway_cpu.client iperf3 -c 127.0.0.1 -p $ENTRY -n "$BYTES" -J)
      e1=$(ticks "$entry_pid") x1=$(ticks "$exit_pid") s1=$(ticks $SERVER)
      gbps=$(python3 -c 'import json,sys; print(round(json.load(sys.stdin)["end"]["sum_received"]["bits_per_second"]/1e9, 2))' <<< "$json")
      client=$(awk '{printf "%.2f", $1 + $2}' /tmp/gateway_cpu.client)
      printf '%s\t%s.%s\t%s\t%s\t%s\t%s\t%s\n' "$v" "$round" "$r" "$gbps" \
        "$(secs $e0 $e1)" "$(secs $x0 $x1)" "$client" "$(secs $s0 $s1)"
    done
    kill -- -"$PAIR" 2>/dev/null; wait "$PAIR" 2>/dev/null || true; PAIR=""
    for _ in $(seq 50); do listening $ENTRY || break; sleep 0.1; done
  done
done
