#!/usr/bin/env python3
"""etcd_reads.py -- linearizable range reads of one key over the JSON gateway, N threads,
fixed duration (the read counterpart of ../shared/bench/etcd_bench.py conc)."""
import argparse, base64, http.client, json, threading, time

p = argparse.ArgumentParser()
p.add_argument("--endpoints", required=True)
p.add_argument("--clients", type=int, default=16)
p.add_argument("--duration", type=float, default=10)
a = p.parse_args()
eps = a.endpoints.split(",")
key = base64.b64encode(b"bench/read/target").decode()


def post(c, path, body):
    c.request("POST", path, body=json.dumps(body), headers={"Content-Type": "application/json"})
    r = c.getresponse()
    out = r.read()
    if r.status != 200:
        raise RuntimeError(out[:200])
    return out


h, port = eps[0].rsplit(":", 1)
post(http.client.HTTPConnection(h, int(port), timeout=5), "/v3/kv/put", {"key": key, "value": base64.b64encode(b"v" * 256).decode()})
stop = time.perf_counter() + a.duration
counts, lats = [0] * a.clients, [[] for _ in range(a.clients)]


def worker(i):
    h, port = eps[i % len(eps)].rsplit(":", 1)
    c = http.client.HTTPConnection(h, int(port), timeout=5)
    while time.perf_counter() < stop:
        s = time.perf_counter()
        post(c, "/v3/kv/range", {"key": key})
        lats[i].append(time.perf_counter() - s)
        counts[i] += 1


t0 = time.perf_counter()
th = [threading.Thread(target=worker, args=(i,)) for i in range(a.clients)]
[t.start() for t in th]
[t.join() for t in th]
el = time.perf_counter() - t0
allv = sorted(x * 1000 for l in lats for x in l)
print(json.dumps({"reads_per_s": round(sum(counts) / el, 1), "p50_ms": round(allv[len(allv) // 2], 3),
                  "p99_ms": round(allv[int(len(allv) * 0.99)], 3), "n": len(allv)}))
