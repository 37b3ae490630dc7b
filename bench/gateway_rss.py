#!/usr/bin/env python3
"""gateway_rss.py PAIR_SCRIPT -- memory and CPU of a meshbridge gateway pair (QUIC).

Starts the pair (bench/gateway-pair.sh) on free ports with an echo backend, then reports:
  - RSS of each gateway idle (after start);
  - RSS with N (default 10,000) client connections open through the tunnel (each one
    proven end to end by a one-byte echo), held open while measuring;
  - CPU seconds (user+sys, both gateways) per Gbit/s moved by `iperf3 -n 1G`.
Prints one JSON line. Loopback only; every process it starts is stopped at the end.
"""
import json, os, resource, signal, socket, subprocess, sys, time

N = int(os.environ.get("CONNS", "10000"))
pair = sys.argv[1]
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 4 * N + 1000), hard))


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


def gateway_pids(entry):
    out = subprocess.run(["pgrep", "-f", "meshbridge gateway --config"], capture_output=True, text=True).stdout.split()
    pids = {}
    for p in out:
        cmd = open(f"/proc/{p}/cmdline").read().replace("\0", " ")
        if "/entry.toml" in cmd:
            pids["entry"] = int(p)
        elif "/exit.toml" in cmd:
            pids["exit"] = int(p)
    return pids


def wait_port(port, proto=socket.SOCK_STREAM, t=30):
    end = time.time() + t
    while time.time() < end:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close(); return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"nothing on {port}")


entry, tunnel, backend, iperf = free_port(), free_port(), free_port(), free_port()
# Echo backend in its own process (its sockets count against its own fd limit).
echo = subprocess.Popen([sys.executable, "-c", f"""
import asyncio, resource
resource.setrlimit(resource.RLIMIT_NOFILE, ({min(hard, 2 * N + 500)}, {hard}))
async def h(r, w):
    try:
        while (d := await r.read(65536)):
            w.write(d); await w.drain()
    except Exception: pass
async def main():
    s = await asyncio.start_server(h, '127.0.0.1', {backend}, backlog=4096)
    await s.serve_forever()
asyncio.run(main())
"""])
iperf_srv = subprocess.Popen(["iperf3", "-s", "-p", str(iperf), "-1"], stdout=subprocess.DEVNULL)
gw = subprocess.Popen(["bash", pair, str(entry), str(tunnel), str(backend), "quic"], start_new_session=True)
out = {}
try:
    wait_port(entry); wait_port(backend)
    time.sleep(1)
    pids = gateway_pids(entry)
    out["rss_idle_kb"] = {k: rss_kb(v) for k, v in pids.items()}
    conns = []
    t0 = time.time()
    for i in range(N):
        c = socket.create_connection(("127.0.0.1", entry), timeout=10)
        c.sendall(b"x")
        conns.append(c)
        if len(conns) % 500 == 0:
            for d in conns[-500:]:
                assert d.recv(1) == b"x"
    for d in conns[len(conns) - len(conns) % 500:]:
        assert d.recv(1) == b"x"
    out["conns"] = len(conns)
    out["open_s"] = round(time.time() - t0, 2)
    out["rss_conns_kb"] = {k: rss_kb(v) for k, v in pids.items()}
    for c in conns:
        c.close()
    # CPU per Gbit/s: a second pair is not needed; point the exit at iperf by a new pair.
    gw2_entry, gw2_tunnel = free_port(), free_port()
    gw2 = subprocess.Popen(["bash", pair, str(gw2_entry), str(gw2_tunnel), str(iperf), "quic"], start_new_session=True)
    try:
        wait_port(gw2_entry); time.sleep(1)
        p2 = {k: v for k, v in gateway_pids(gw2_entry).items()}
        # gateway_pids matches by name; the newest pair's processes have the higher pids.
        all_gw = subprocess.run(["pgrep", "-f", "meshbridge gateway --config"], capture_output=True, text=True).stdout.split()
        newest = sorted(int(p) for p in all_gw)[-2:]
        before = sum(cpu_s(p) for p in newest)
        r = subprocess.run(["iperf3", "-c", "127.0.0.1", "-p", str(gw2_entry), "-n", "1G", "-J"], capture_output=True, text=True)
        after = sum(cpu_s(p) for p in newest)
        j = json.loads(r.stdout)
        gbps = j["end"]["sum_received"]["bits_per_second"] / 1e9
        secs = j["end"]["sum_received"]["seconds"]
        out["iperf_gbps"] = round(gbps, 2)
        out["cpu_s_per_gbit"] = round((after - before) / (gbps * secs), 3)
    finally:
        os.killpg(gw2.pid, signal.SIGTERM); gw2.wait()
finally:
    os.killpg(gw.pid, signal.SIGTERM); gw.wait()
    echo.kill(); iperf_srv.kill()
print(json.dumps(out))
