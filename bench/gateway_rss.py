#!/usr/bin/env python3
"""gateway_rss.py PAIR_SCRIPT -- memory and CPU of a meshbridge gateway pair (QUIC), and
optionally of the stunnel and haproxy pairs of ../shared/bench, in the same run.

For each implementation and each run (RUNS, default 3; runs interleaved impl by impl so all
see the same background load), on fresh pairs on free loopback ports:
  - RSS of each gateway idle: after start, before any client connection (meshbridge dials
    its tunnel link on the first one);
  - RSS of each gateway with N (env CONNS, default 10,000) client connections open through
    the pair to an echo backend, each one proven end to end by a one-byte echo, held open
    while measuring;
  - CPU seconds (user+sys, both gateways) per Gbit moved by `iperf3 -n 1G` (1 stream)
    through a second pair whose exit forwards to an iperf3 server. Equal to the cores busy
    per Gbit/s of throughput.
Prints one JSON line per measurement, then a summary (median, min-max) as JSON.

  PEERS="stunnel haproxy" RUNS=3 python3 bench/gateway_rss.py bench/gateway-pair.sh

PEERS uses path_start of ../shared/bench/paths.sh (HARNESS=/work/shared/bench), with its
own scratch dir and test PKI, and haproxy's `maxconn 9000` there raised to 9500 (headroom
over 9,000 connections). A TLS proxy needs two descriptors per connection, so with the
hard RLIMIT_NOFILE of 20,000 here (not raisable: no CAP_SYS_RESOURCE) stunnel and haproxy
cannot hold 10,000 connections (stunnel serves at most fds*125/256 = 9,765): compare them
with CONNS=9000. A meshbridge gateway needs one descriptor per client connection (the
tunnel is one UDP socket). The script raises its RLIMIT_NOFILE (inherited by everything
it starts) to FD_LIMIT (default 65536) where allowed, else to the hard limit.

No connection goes through a pair before the N measured ones: a meshbridge QUIC link
carries at most 10,000 concurrent streams (gateway/src/quic.rs), and quinn returns the
credit of closed streams to the peer only in batches of more than 1/8 of that (1,250), so
after even one closed connection (the old readiness probe) the 10,000th waits forever for a
stream. The echo backend closes each connection when its client half-closes (it used to
keep them half-open, so closed clients also left their tunnel streams open).
Loopback only; every process it starts is stopped at the end.
"""
import json, os, resource, shutil, signal, socket, statistics, subprocess, sys, tempfile, time

N = int(os.environ.get("CONNS", "10000"))
RUNS = int(os.environ.get("RUNS", "3"))
PEERS = os.environ.get("PEERS", "").split()
HARNESS = os.environ.get("HARNESS", "/work/shared/bench")
FD_LIMIT = int(os.environ.get("FD_LIMIT", "65536"))
ECHO_TIMEOUT = 10.0
BATCH = 500
pair_script = os.path.abspath(sys.argv[1])

soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
try:
    resource.setrlimit(resource.RLIMIT_NOFILE, (FD_LIMIT, max(hard, FD_LIMIT)))
except (ValueError, OSError):  # not root: use what we have
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
FDS = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
if FDS < N + 1000:
    raise SystemExit(f"RLIMIT_NOFILE {FDS} is too small for {N} connections")


def log(*a):
    print(time.strftime("[%H:%M:%S]"), *a, file=sys.stderr, flush=True)


def free_port():
    s = socket.socket(); s.bind(("127.0.0.1", 0)); p = s.getsockname()[1]; s.close(); return p


def rss_kb(pid):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1])
    return 0


def cpu_s(pid):
    f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")


def load_now():
    return open("/proc/loadavg").read().split()[0]


def listening(port, udp=False):
    out = subprocess.run(["ss", "-lunH" if udp else "-ltnH", f"sport = :{port}"],
                         capture_output=True, text=True).stdout
    return bool(out.strip())


def wait_listening(port, udp=False, t=30):
    end = time.time() + t
    while time.time() < end:
        if listening(port, udp):
            return
        time.sleep(0.1)
    raise RuntimeError(f"nothing listening on 127.0.0.1:{port} ({'udp' if udp else 'tcp'}) after {t}s")


class Pair:
    """One gateway pair: ENTRY (plaintext in) -> tunnel -> exit -> 127.0.0.1:backend."""

    def __init__(self, impl, backend, scratch):
        self.impl, self.entry, self.tunnel = impl, free_port(), free_port()
        if impl == "meshbridge":
            cmd = ["bash", pair_script, str(self.entry), str(self.tunnel), str(backend), "quic"]
            env = dict(os.environ)
        else:
            # The harness's own path_start (configs, PKI, spawn/stop), slot 0 on our ports.
            snippet = (
                f'source "{HARNESS}/common.sh"; source "{HARNESS}/paths.sh"\n'
                "eval \"$(declare -f _haproxy_cfgs | sed 's/maxconn 9000/maxconn 9500/')\"\n"
                f"BACKEND_PORT={backend}; path_start {impl}; wait\n")
            cmd = ["bash", "-c", snippet]
            self.root = os.path.join(scratch, impl)
            env = dict(os.environ, BENCH_ROOT=self.root, PKI_DIR=os.path.join(scratch, "pki"),
                       ENTRY_PORT=str(self.entry), TUNNEL_PORT=str(self.tunnel), QUIET_MAX="0")
        self.err = open(os.path.join(scratch, f"{impl}-{self.entry}.log"), "w")
        self.proc = subprocess.Popen(cmd, env=env, start_new_session=True,
                                     stdout=self.err, stderr=self.err)
        try:
            wait_listening(self.tunnel, udp=(impl == "meshbridge"))
            wait_listening(self.entry)
            self.pids = self._pids()
        except Exception as e:
            self.stop()
            tail = open(self.err.name).read()[-2000:]
            raise RuntimeError(f"{impl} pair did not start: {e}\n{tail}") from None

    def _pids(self):
        if self.impl == "meshbridge":
            pids = {}
            for p in os.listdir("/proc"):
                if not p.isdigit():
                    continue
                try:
                    if os.getpgid(int(p)) != self.proc.pid:
                        continue
                    cmd = open(f"/proc/{p}/cmdline").read().replace("\0", " ")
                except OSError:
                    continue
                if "gateway --config" in cmd:
                    pids["entry" if "/entry.toml" in cmd else "exit"] = int(p)
        else:
            d = os.path.join(self.root, "logs")
            pids = {s: int(open(f"{d}/{self.impl}-{s}.pid").read()) for s in ("entry", "exit")}
        if set(pids) != {"entry", "exit"}:
            raise RuntimeError(f"{self.impl}: gateway processes not found: {pids}")
        return pids

    def rss(self):
        return {k: rss_kb(v) for k, v in self.pids.items()}

    def cpu(self):
        return sum(cpu_s(p) for p in self.pids.values())

    def stop(self):
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL); self.proc.wait()
        self.err.close()


def open_conns(port):
    """N connections, each proven by a one-byte echo; raises with the index of a failure."""
    conns = []
    try:
        for i in range(N):
            c = socket.create_connection(("127.0.0.1", port), timeout=ECHO_TIMEOUT)
            c.sendall(b"x")
            conns.append(c)
            if len(conns) % BATCH == 0 or len(conns) == N:
                first = (len(conns) - 1) // BATCH * BATCH
                for j in range(first, len(conns)):
                    try:
                        got = conns[j].recv(1)
                    except socket.timeout:
                        got = None
                    if got != b"x":
                        raise RuntimeError(
                            f"connection {j + 1} of {N} got {got!r}, not the echo, within "
                            f"{ECHO_TIMEOUT:.0f} s (meshbridge: at most 10,000 concurrent streams "
                            "per QUIC link, fewer after closed ones; see the header)")
        return conns
    except BaseException:
        for c in conns:
            c.close()
        raise


def measure_conns(impl, backend, scratch):
    pair = Pair(impl, backend, scratch)
    try:
        time.sleep(1)
        r = {"impl": impl, "load1": load_now(), "rss_idle_kb": pair.rss()}
        t0 = time.time()
        conns = open_conns(pair.entry)
        r["open_s"] = round(time.time() - t0, 2)
        time.sleep(1)
        r["conns"] = len(conns)
        r["rss_conns_kb"] = pair.rss()
        for c in conns:
            c.close()
        return r
    finally:
        pair.stop()


def measure_cpu(impl, iperf_port, scratch):
    pair = Pair(impl, iperf_port, scratch)
    try:
        time.sleep(1)
        load = load_now()
        before = pair.cpu()
        p = subprocess.run(["iperf3", "-c", "127.0.0.1", "-p", str(pair.entry), "-n", "1G", "-J"],
                           capture_output=True, text=True, timeout=300)
        after = pair.cpu()
        j = json.loads(p.stdout)
        if "error" in j:
            raise RuntimeError(f"iperf3: {j['error']}")
        gbps = j["end"]["sum_received"]["bits_per_second"] / 1e9
        secs = j["end"]["sum_received"]["seconds"]
        return {"impl": impl, "load1": load, "iperf_gbps": round(gbps, 2),
                "cpu_s": round(after - before, 2),
                "cpu_s_per_gbit": round((after - before) / (gbps * secs), 3)}
    finally:
        pair.stop()


ECHO = """
import asyncio, sys
async def h(r, w):
    try:
        while (d := await r.read(65536)):
            w.write(d); await w.drain()
    except Exception: pass
    finally:
        w.close()  # the client half-closed: close, so the tunnel stream ends too
async def main():
    s = await asyncio.start_server(h, '127.0.0.1', int(sys.argv[1]), backlog=4096)
    await s.serve_forever()
asyncio.run(main())
"""

scratch = tempfile.mkdtemp(prefix="gwrss.")
backend, iperf = free_port(), free_port()
echo = subprocess.Popen([sys.executable, "-c", ECHO, str(backend)])
iperf_srv = subprocess.Popen(["iperf3", "-s", "-p", str(iperf)], stdout=subprocess.DEVNULL)
impls = ["meshbridge"] + PEERS
results = []
try:
    wait_listening(backend); wait_listening(iperf)
    for run in range(1, RUNS + 1):
        for impl in impls:
            log(f"run {run}/{RUNS} {impl}: {N} connections (load {load_now()})")
            r = measure_conns(impl, backend, scratch)
            log(f"run {run}/{RUNS} {impl}: iperf3 -n 1G (load {load_now()})")
            r.update({k: v for k, v in measure_cpu(impl, iperf, scratch).items()
                      if k != "impl" and k != "load1"})
            r["run"] = run
            r["load1_cpu"] = load_now()
            results.append(r)
            print(json.dumps(r), flush=True)
finally:
    for p in (echo, iperf_srv):
        p.kill(); p.wait()
    shutil.rmtree(scratch, ignore_errors=True)


def med(xs):
    xs = sorted(xs)
    return {"median": statistics.median(xs), "min": xs[0], "max": xs[-1]}


summary = {}
for impl in impls:
    rs = [r for r in results if r["impl"] == impl]
    s = {"runs": len(rs), "conns": N}
    for side in ("entry", "exit"):
        s[f"rss_idle_kb_{side}"] = med([r["rss_idle_kb"][side] for r in rs])
        s[f"rss_conns_kb_{side}"] = med([r["rss_conns_kb"][side] for r in rs])
    s["rss_conns_kb_both"] = med([sum(r["rss_conns_kb"].values()) for r in rs])
    s["kb_per_conn_both"] = med([round((sum(r["rss_conns_kb"].values()) - sum(r["rss_idle_kb"].values())) / N, 2) for r in rs])
    s["open_s"] = med([r["open_s"] for r in rs])
    s["iperf_gbps"] = med([r["iperf_gbps"] for r in rs])
    s["cpu_s_per_gbit"] = med([r["cpu_s_per_gbit"] for r in rs])
    summary[impl] = s
print(json.dumps({"summary": summary}))
