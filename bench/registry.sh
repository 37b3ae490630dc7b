#!/usr/bin/env bash
# registry.sh -- meshbridge registry vs a 3-member etcd, side by side, runs interleaved.
#
# Both clusters run at once on loopback, data under $BENCH_ROOT (same disk), fsync before
# acknowledging (etcd: WAL fsync; meshbridge: redb Durability::Immediate on every node).
# Each run does the etcd measurement, then the meshbridge one, so both see the same load.
#   seq       2000 sequential puts of ~256 B on one connection, via the leader
#   seqpair   the same, paired finely: PAIRS (default 10) blocks of BLOCK (default 300) puts,
#             etcd then meshbridge back to back, and the ratio of each pair; the median
#             of the pairs' ratios resists the machine's drifts better than whole runs
#   conc16/64 16 and 64 concurrent writers for 10 s (etcd: Python threads on the JSON
#             gateway, its bench client; meshbridge: bench/loadgen regload, Rust gRPC)
#   reads     16 concurrent linearizable reads for 10 s (etcd: serializable=false range)
#   failover  SIGKILL the leader; time to the first successful write via the survivors
#   watch     meshbridge only: write on node A -> seen by a watcher on node B (p50/p99)
#   dns       meshbridge only: export write on the leader -> `meshbridge dns`, following a
#             follower as site "bench", answers the new address (p50/p99; DNS_BACKGROUND
#             services loaded first, default 10000, so each change rebuilds a full index)
#   scale     meshbridge only: SITES x SERVICES x ENDPOINTS, then RSS per node, snapshot
#             and store size, and the time for a new (4th) node to catch up
# Usage: bench/registry.sh   Env: RUNS=3 TESTS="seq conc reads failover watch dns scale"
#        SITES=100 SERVICES=100 ENDPOINTS=10 (100k endpoints); SNAPSHOT_EVERY=5000
#        (raft.snapshot_every_logs: lower it to make the scale run snapshot and the
#        new node catch up from the snapshot); WORKERS=<registry threads per node>;
#        REGLOAD_THREADS=<client threads, 1 = current-thread>
# Output: summary lines on stdout; raw JSON lines in $BENCH_ROOT/results/registry.jsonl.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
SHARED=${SHARED:-$ROOT/../shared/bench}
source "$SHARED/common.sh"
TESTS=${TESTS:-seq conc reads failover watch dns scale}
SITES=${SITES:-100}; SERVICES=${SERVICES:-100}; ENDPOINTS=${ENDPOINTS:-10}
want() { [[ " $TESTS " == *" $1 "* ]]; }
MB=${MB:-$ROOT/target/release/meshbridge}
REGLOAD=$ROOT/target/release/regload
[ -x "$MB" ] && [ -x "$REGLOAD" ] || die "build first: cargo build --release -p meshbridge -p meshbridge-bench"
D=$BENCH_ROOT/mbreg
J=$BENCH_ROOT/results/registry.jsonl
PY="python3 $SHARED/etcd_bench.py"
EPS=127.0.0.1:23791,127.0.0.1:23792,127.0.0.1:23793
CLUSTER=m1=http://127.0.0.1:23801,m2=http://127.0.0.1:23802,m3=http://127.0.0.1:23803
URLS=https://127.0.0.1:27401,https://127.0.0.1:27402,https://127.0.0.1:27403
declare -A EPID MPID
export ETCDCTL_API=3
record() { echo "{\"test\":\"$1\",\"system\":\"$2\",\"run\":$3,\"load\":\"$RUN_LOAD\",\"result\":$4}" >> "$J"; }
field() { python3 -c "import json,sys; v=json.loads(sys.argv[1])$2; print('' if v is None else v)" "$1"; }

start_etcd() { local i=$1
  spawn "etcd-m$i" etcd --name "m$i" --data-dir "$D/etcd/m$i" \
    --listen-client-urls "http://127.0.0.1:2379$i" --advertise-client-urls "http://127.0.0.1:2379$i" \
    --listen-peer-urls "http://127.0.0.1:2380$i" --initial-advertise-peer-urls "http://127.0.0.1:2380$i" \
    --initial-cluster "$CLUSTER" --initial-cluster-state new --initial-cluster-token bench \
    --logger zap --log-level warn --log-outputs stderr
  EPID[127.0.0.1:2379$i]=$SPAWNED_PID; }
start_mb() { local i=$1
  spawn "mbreg-$i" "$MB" registry --config "$D/n$i.toml"
  MPID[https://127.0.0.1:2740$i]=$SPAWNED_PID; }
mb_pids() { local k s=""; for k in "${!MPID[@]}"; do s+="$k=${MPID[$k]},"; done; echo "${s%,}"; }
etcd_pids() { local k s=""; for k in "${!EPID[@]}"; do s+="$k=${EPID[$k]},"; done; echo "${s%,}"; }
wait_etcd() { local i; for i in $(seq 150); do
  [ -n "$($PY leader --endpoints "$EPS" | python3 -c 'import json,sys; print(json.load(sys.stdin)["leader_ep"] or "")')" ] && return 0; sleep 0.2; done; die "etcd not healthy"; }
wait_mb() { local i; for i in $(seq 150); do
  "$MB" ctl --registry "$URLS" --tls-dir "$D/ctl" status -o json 2>/dev/null | python3 -c 'import json,sys; d=json.load(sys.stdin); sys.exit(0 if d["registry"]["leader_id"] and all(n.get("reachable") for n in d["registry"]["nodes"]) else 1)' && return 0; sleep 0.2; done; die "meshbridge registry not healthy"; }
rl() { "$REGLOAD" --registry "$1" --tls-dir "$D/ctl" "${@:2}"; }
mb_leader() { "$MB" ctl --registry "$URLS" --tls-dir "$D/ctl" status -o json | python3 -c 'import json,sys; d=json.load(sys.stdin); l=d["registry"]["leader_id"]; print(next(n["url"] for n in d["registry"]["nodes"] if n.get("node_id")==l))'; }

for p in 23791 23792 23793 23801 23802 23803 27401 27402 27403 27404 27453; do is_listening $p && die "port $p busy"; done
rm -rf "$D"; mkdir -p "$D/etcd"
"$MB" pki init --trust-domain bench.local --out "$D/ca" >/dev/null
"$MB" pki issue --id spiffe://bench.local/ctl/bench --ca "$D/ca" --out "$D/ctl" --ttl 30d >/dev/null
for i in 1 2 3 4; do
  "$MB" pki issue --id "spiffe://bench.local/registry/$i" --ca "$D/ca" --out "$D/tls$i" --ttl 30d >/dev/null
  cat > "$D/n$i.toml" <<CFG
node_id = $i
workers = ${WORKERS:-0}
listen = "127.0.0.1:2740$i"
admin_listen = "127.0.0.1:2750$i"
data_dir = "$D/data$i"
[tls]
cert = "$D/tls$i/cert.pem"
key = "$D/tls$i/key.pem"
bundle = "$D/tls$i/bundle.pem"
[raft]
snapshot_every_logs = ${SNAPSHOT_EVERY:-5000}
[initial_members]
1 = "https://127.0.0.1:27401"
2 = "https://127.0.0.1:27402"
3 = "https://127.0.0.1:27403"
CFG
done
sed -i '/^\[initial_members\]/,$d' "$D/n4.toml"; echo '[initial_members]' >> "$D/n4.toml"
for i in 1 2 3; do start_etcd "$i"; start_mb "$i"; done
wait_etcd; wait_mb
ELEADER=$($PY leader --endpoints "$EPS" | python3 -c 'import json,sys; print(json.load(sys.stdin)["leader_ep"])')
log "both clusters up; etcd leader $ELEADER, meshbridge leader $(mb_leader)"

summ() { printf '%s\n' "${@:3}" | summarize "$1" "$2"; }
# Sums and counts of the registry's latency histograms on every node (admin ports 27501-3).
scrape() { local i; for i in 1 2 3; do
  curl -s "http://127.0.0.1:2750$i/metrics" | sed "s/^/n$i /" | grep -E "_seconds_(sum|count)" || true; done; }
# Mean of each histogram over a run, from two scrapes: "before" file, "after" file.
breakdown() { python3 - "$1" "$2" <<'PY'
import sys, collections
def load(p):
    d = {}
    for line in open(p):
        node, series, value = line.split()
        d[(node, series)] = float(value)
    return d
a, b = load(sys.argv[1]), load(sys.argv[2])
out = collections.OrderedDict()
for (node, series), v in sorted(b.items()):
    if not series.split("{")[0].endswith("_sum"): continue
    cnt = series.replace("_sum", "_count")
    n = b.get((node, cnt), 0) - a.get((node, cnt), 0)
    if n <= 0: continue
    s = v - a.get((node, series), 0)
    name = series.replace("meshbridge_registry_", "").replace("_seconds_sum", "")
    print(f"  {node} {name}: mean {s / n * 1000:.3f} ms over {int(n)}")
PY
}

if want seq; then
  e50=(); e99=(); er=(); m50=(); m99=(); mr=()
  for r in $(seq "$RUNS"); do
    wait_quiet; out=$($PY seq --endpoint "$ELEADER" --n 2000); record seq etcd "$r" "$out"
    e50+=("$(field "$out" '["p50_ms"]')"); e99+=("$(field "$out" '["p99_ms"]')"); er+=("$(field "$out" '["puts_per_s"]')")
    wait_quiet; scrape > "$BENCH_ROOT/metrics.before"
    out=$(rl "$(mb_leader)" seq --n 2000); record seq meshbridge "$r" "$out"
    scrape > "$BENCH_ROOT/metrics.after"
    log "meshbridge seq run $r, where the time went (leader $(mb_leader)):"
    breakdown "$BENCH_ROOT/metrics.before" "$BENCH_ROOT/metrics.after" >&2
    for i in 1 2 3; do curl -s "http://127.0.0.1:2750$i/metrics" | grep '^meshbridge_registry_early_appends' | sed "s/^/  n$i /" >&2 || true; done
    m50+=("$(field "$out" '["p50_ms"]')"); m99+=("$(field "$out" '["p99_ms"]')"); mr+=("$(field "$out" '["puts_per_s"]')")
    log "seq run $r done"
  done
  summ "etcd seq put p50" ms "${e50[@]}"; summ "meshbridge seq put p50" ms "${m50[@]}"
  summ "etcd seq put p99" ms "${e99[@]}"; summ "meshbridge seq put p99" ms "${m99[@]}"
  summ "etcd seq put rate" puts/s "${er[@]}"; summ "meshbridge seq put rate" puts/s "${mr[@]}"
fi

if want seqpair; then
  PAIRS=${PAIRS:-10}; BLOCK=${BLOCK:-300}
  r50=(); r99=(); rr=()
  for b in $(seq "$PAIRS"); do
    eo=$($PY seq --endpoint "$ELEADER" --n "$BLOCK"); record seqpair etcd "$b" "$eo"
    mo=$(rl "$(mb_leader)" seq --n "$BLOCK"); record seqpair meshbridge "$b" "$mo"
    ratio() { python3 -c "import json,sys; e=json.loads(sys.argv[1]); m=json.loads(sys.argv[2]); print(round(m['$1']/e['$1'], 3))" "$eo" "$mo"; }
    r50+=("$(ratio p50_ms)"); r99+=("$(ratio p99_ms)"); rr+=("$(ratio puts_per_s)")
    log "seqpair $b: etcd p50 $(field "$eo" '["p50_ms"]') ms, meshbridge p50 $(field "$mo" '["p50_ms"]') ms"
  done
  summ "seqpair p50 meshbridge/etcd" x "${r50[@]}"
  summ "seqpair p99 meshbridge/etcd" x "${r99[@]}"
  summ "seqpair puts/s meshbridge/etcd" x "${rr[@]}"
fi

if want conc; then
  for c in 16 64; do
    er=(); e99=(); mr=(); m99=()
    for r in $(seq "$RUNS"); do
      wait_quiet; out=$($PY conc --endpoints "$EPS" --clients "$c" --duration 10); record "conc$c" etcd "$r" "$out"
      er+=("$(field "$out" '["puts_per_s"]')"); e99+=("$(field "$out" '["p99_ms"]')")
      wait_quiet; out=$(rl "$URLS" conc --clients "$c" --duration 10); record "conc$c" meshbridge "$r" "$out"
      mr+=("$(field "$out" '["puts_per_s"]')"); m99+=("$(field "$out" '["p99_ms"]')")
      log "conc$c run $r done"
    done
    summ "etcd conc$c put rate" puts/s "${er[@]}"; summ "meshbridge conc$c put rate" puts/s "${mr[@]}"
    summ "etcd conc$c put p99" ms "${e99[@]}"; summ "meshbridge conc$c put p99" ms "${m99[@]}"
  done
fi

if want reads; then
  er=(); mr=()
  for r in $(seq "$RUNS"); do
    wait_quiet
    out=$(python3 "$HERE/etcd_reads.py" --endpoints "$EPS" --clients 16 --duration 10); record reads etcd "$r" "$out"
    er+=("$(field "$out" '["reads_per_s"]')")
    wait_quiet; out=$(rl "$URLS" reads --clients 16 --duration 10); record reads meshbridge "$r" "$out"
    mr+=("$(field "$out" '["reads_per_s"]')")
    log "reads run $r done"
  done
  summ "etcd linearizable reads (16 clients)" reads/s "${er[@]}"; summ "meshbridge linearizable reads (16 clients)" reads/s "${mr[@]}"
fi

if want watch; then
  m50=(); m99=()
  for r in $(seq "$RUNS"); do
    wait_quiet; leader=$(mb_leader); other=$(tr ',' '\n' <<<"$URLS" | grep -v "$leader" | head -1)
    out=$(rl "$leader,$other" watch --n 500); record watch meshbridge "$r" "$out"
    m50+=("$(field "$out" '["p50_ms"]')"); m99+=("$(field "$out" '["p99_ms"]')")
  done
  summ "meshbridge watch propagation p50" ms "${m50[@]}"; summ "meshbridge watch propagation p99" ms "${m99[@]}"
fi

if want dns; then
  leader=$(mb_leader); other=$(tr ',' '\n' <<<"$URLS" | grep -v "$leader" | head -1)
  "$MB" pki issue --id spiffe://bench.local/site/bench/dns --ca "$D/ca" --out "$D/dns" --ttl 30d >/dev/null
  cat > "$D/dns.toml" <<CFG
[dns]
listen = "127.0.0.1:27453"
site = "bench"
[dns.rate_limit]
per_client_qps = 0
[source]
registry = ["$other"]
[tls]
cert = "$D/dns/cert.pem"
key = "$D/dns/key.pem"
bundle = "$D/dns/bundle.pem"
CFG
  spawn mbdns "$MB" dns --config "$D/dns.toml"; DNSPID=$SPAWNED_PID
  wait_port 27453 30
  m50=(); m99=(); a99=()
  for r in $(seq "$RUNS"); do
    wait_quiet
    out=$(rl "$leader" dns --server 127.0.0.1:27453 --n 200 --background "${DNS_BACKGROUND:-10000}"); record dns meshbridge "$r" "$out"
    m50+=("$(field "$out" '["p50_ms"]')"); m99+=("$(field "$out" '["p99_ms"]')"); a99+=("$(field "$out" '["after_ack"]["p99_ms"]')")
    log "dns run $r: $out"
  done
  kill "$DNSPID" 2>/dev/null || true
  summ "meshbridge export write -> DNS answer p50" ms "${m50[@]}"; summ "meshbridge export write -> DNS answer p99" ms "${m99[@]}"
  summ "meshbridge write acknowledged -> DNS answer p99" ms "${a99[@]}"
fi

if want failover; then
  ef=(); mf=()
  for r in $(seq "$RUNS"); do
    wait_etcd; wait_mb; sleep 2; wait_quiet
    out=$($PY failover --endpoints "$EPS" --pids "$(etcd_pids)"); record failover etcd "$r" "$out"
    ef+=("$(field "$out" '.get("first_write_ok_s")')")
    killed=$(field "$out" '["killed_ep"]'); i=${killed: -1}
    wait "${EPID[$killed]}" 2>/dev/null || true; start_etcd "$i"
    wait_quiet
    out=$(rl "$URLS" failover --pids "$(mb_pids)"); record failover meshbridge "$r" "$out"
    mf+=("$(field "$out" '["first_write_ok_s"]')")
    killed=$(field "$out" '["killed"]'); i=${killed: -1}
    wait "${MPID[$killed]}" 2>/dev/null || true; start_mb "$i"
    log "failover run $r done"
  done
  summ "etcd failover: kill -> first put" s "${ef[@]}"; summ "meshbridge failover: kill -> first put" s "${mf[@]}"
fi

if want scale; then
  wait_mb; wait_quiet
  out=$(rl "$URLS" scale --sites "$SITES" --services "$SERVICES" --endpoints "$ENDPOINTS"); record scale meshbridge 1 "$out"
  log "scale load: $out"
  for i in 1 2 3; do
    rss=$(awk '/VmRSS/{print $2}' "/proc/${MPID[https://127.0.0.1:2740$i]}/status")
    log "node $i RSS ${rss} kB; store $(du -sh "$D/data$i" | cut -f1)"
    echo "{\"test\":\"scale-rss\",\"node\":$i,\"rss_kb\":$rss,\"store_bytes\":$(du -sb "$D/data$i" | cut -f1)}" >> "$J"
  done
  # A new node joins as a learner and catches up (snapshot + log).
  spawn mbreg-4 "$MB" registry --config "$D/n4.toml"; MPID[https://127.0.0.1:27404]=$SPAWNED_PID
  wait_port 27404 30
  t0=$(date +%s.%N)
  if ! "$MB" ctl --registry "$URLS" --tls-dir "$D/ctl" members add 4 https://127.0.0.1:27404 >"$BENCH_ROOT/logs/members-add.out" 2>&1; then
    log "members add failed:"; cat "$BENCH_ROOT/logs/members-add.out" >&2; exit 1
  fi
  # `members add` returns once the leader counts the learner as replicating; caught up means
  # its applied index reached the leader's.
  applied() { curl -s "http://127.0.0.1:$1/metrics" | awk '/^meshbridge_registry_applied_index/{print $2}'; }
  target=0; for p in 27501 27502 27503; do a=$(applied $p); [ -n "$a" ] && [ "$a" -gt "$target" ] && target=$a; done
  for _ in $(seq 1 1200); do a=$(applied 27504); [ -n "$a" ] && [ "$a" -ge "$target" ] && break; sleep 0.05; done
  [ -n "$a" ] && [ "$a" -ge "$target" ] || { log "node 4 did not catch up (applied ${a:-?} < $target)"; exit 1; }
  t1=$(date +%s.%N)
  catchup=$(python3 -c "print(round($t1-$t0,3))")
  rss4=$(awk '/VmRSS/{print $2}' "/proc/${MPID[https://127.0.0.1:27404]}/status")
  log "new node caught up in ${catchup}s; RSS ${rss4} kB; store $(du -sh "$D/data4" | cut -f1)"
  echo "{\"test\":\"scale-catchup\",\"seconds\":$catchup,\"rss_kb\":$rss4}" >> "$J"
  grep -h "built snapshot\|installed snapshot" "$BENCH_ROOT/logs/mbreg-"*.log | sed "s/\x1b\[[0-9;]*m//g" | tail -4 >&2 || true
fi
exit 0
