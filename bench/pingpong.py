#!/usr/bin/env python3
"""pingpong.py -- one connection's round-trip latency through a TCP path, without HTTP.

  python3 bench/pingpong.py echo PORT              a threaded echo server on 127.0.0.1:PORT
  python3 bench/pingpong.py ping PORT [N] [SIZE]   N round trips (default 5000) of SIZE bytes
                                                   (default 100) to 127.0.0.1:PORT; prints p50/p90/p99

Both sides set TCP_NODELAY. Put a gateway pair in between (bench/gateway-pair.sh ENTRY
TUNNEL ECHO_PORT quic) and compare with the echo port itself (direct) or a peer pair, runs
interleaved. Loopback only; the run stops after N round trips.
"""
import socket
import sys
import threading
import time


def echo(port):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", port))
    s.listen(128)

    def serve(c):
        c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with c:
            while True:
                d = c.recv(65536)
                if not d:
                    return
                c.sendall(d)

    while True:
        c, _ = s.accept()
        threading.Thread(target=serve, args=(c,), daemon=True).start()


def ping(port, n, size):
    deadline = time.monotonic() + 10
    while True:
        try:
            c = socket.create_connection(("127.0.0.1", port), timeout=10)
            break
        except OSError as e:
            if time.monotonic() > deadline:
                sys.exit(f"cannot connect to 127.0.0.1:{port} within 10 s: {e}")
            time.sleep(0.1)
    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    msg = b"x" * size
    lat = []
    for _ in range(n):
        t = time.perf_counter_ns()
        c.sendall(msg)
        got = 0
        while got < size:
            d = c.recv(65536)
            if not d:
                sys.exit(f"connection closed after {len(lat)} round trips")
            got += len(d)
        lat.append(time.perf_counter_ns() - t)
    lat.sort()
    q = lambda f: lat[min(len(lat) - 1, int(len(lat) * f))] / 1000
    print(f"p50 {q(0.5):.1f} us p90 {q(0.9):.1f} p99 {q(0.99):.1f} n={n}")


if __name__ == "__main__":
    if len(sys.argv) < 3 or sys.argv[1] not in ("echo", "ping"):
        sys.exit(__doc__)
    names = ["PORT", "N", "SIZE"]
    try:
        nums = [int(a) for a in sys.argv[2:5]]
    except ValueError:
        bad = next(n for n, a in zip(names, sys.argv[2:5]) if not a.lstrip("-").isdigit())
        sys.exit(f"{bad} must be a whole number\n{__doc__}")
    for name, v, lo, hi in zip(names, nums, (1, 1, 1), (65535, 10**8, 1 << 20)):
        if not lo <= v <= hi:
            sys.exit(f"{name} must be in {lo}..{hi}, not {v}")
    if sys.argv[1] == "echo":
        echo(nums[0])
    else:
        ping(nums[0], nums[1] if len(nums) > 1 else 5000, nums[2] if len(nums) > 2 else 100)
