"""The cross-process activation hop on loopback, measured, beside the cost model's prediction.

Two ``jax.distributed`` processes (``hexjax launch`` machinery, one CPU device each,
gloo + cross-host transfer sockets on 127.0.0.1) move a float32 activation
``[rows, tokens, hidden]`` from process 0's device to process 1's and back with
``hexjax.runtime.distributed.move`` (the path a pipeline hop takes). A hop is half
the median round trip.

Loopback itself is measured first, without JAX: one process streams 512 MiB
through a TCP socket on 127.0.0.1 to another (``sendall`` / ``recv_into`` with
4 MiB buffers; median of three) for the bandwidth, and 2,000 one-byte ping-pongs
give the latency (half the median round trip). A two-host cluster whose network is that bandwidth and
latency then gives ``hexjax.search.cost.hop_s`` for the same bytes: the prediction.

The host path (through the coordination service's key-value store, used for
stages that span processes) is timed on the same sizes for comparison.

    python benchmarks/multihost_hop.py [--hidden 768] [--tokens 1 64 512] [--rows 8] [--repeats 7]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import time
from multiprocessing import Process, Queue

CHUNK = 4 << 20


def _sink(port_q: Queue, total: int) -> None:
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(1)
        port_q.put(srv.getsockname()[1])
        conn, _ = srv.accept()
        with conn:
            buf = bytearray(CHUNK)
            view, got = memoryview(buf), 0
            while got < total:
                n = conn.recv_into(view)
                if not n:
                    break
                got += n
            conn.sendall(b"k")
            # latency: echo single bytes
            while True:
                b = conn.recv(1)
                if not b or b == b"q":
                    break
                conn.sendall(b)


def loopback(total: int = 512 << 20, pings: int = 2000) -> tuple[float, float]:
    """(bandwidth bytes/s, one-way latency s) of a TCP stream between two processes on 127.0.0.1."""
    q: Queue = Queue()
    p = Process(target=_sink, args=(q, total))
    p.start()
    port = q.get(timeout=30)
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        data = memoryview(bytearray(CHUNK))
        t0 = time.perf_counter()
        sent = 0
        while sent < total:
            s.sendall(data)
            sent += CHUNK
        s.recv(1)   # the sink has everything
        bw = total / (time.perf_counter() - t0)
        rtts = []
        for _ in range(pings):
            t = time.perf_counter()
            s.sendall(b"x")
            s.recv(1)
            rtts.append(time.perf_counter() - t)
        s.sendall(b"q")
    p.join(timeout=30)
    return bw, statistics.median(rtts) / 2


def child(args) -> None:
    """One process of the run: time ``move`` 0 -> 1 -> 0 for each size (both processes call everything)."""
    from hexjax.runtime import distributed
    assert distributed.initialize_from_env()
    import jax
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    devs = sorted(jax.devices(), key=lambda d: d.process_index)
    on = [NamedSharding(Mesh(np.array([d]), ("x",)), P()) for d in devs]
    both = NamedSharding(Mesh(np.array(devs), ("x",)), P())   # spans both processes: the host path
    me, rows = jax.process_index(), []
    for tokens in args.tokens:
        shape = (args.rows, tokens, args.hidden)
        x = jax.device_put(np.ones(shape, np.float32), on[0])
        times = {"direct": [], "host": []}
        for r in range(args.repeats + 1):
            t0 = time.perf_counter()
            y = distributed.move(distributed.move(x, on[1]), on[0])
            if me == 0:
                y.block_until_ready()
            t1 = time.perf_counter()
            z = distributed.move(x, both)
            z.block_until_ready()
            t2 = time.perf_counter()
            if r:   # the first round compiles and connects
                times["direct"].append((t1 - t0) / 2)
                times["host"].append(t2 - t1)
        rows.append({"shape": list(shape), "bytes": int(np.prod(shape)) * 4,
                     "direct_s": statistics.median(times["direct"]), "host_s": statistics.median(times["host"])})
    if me == 0:
        print("RESULT " + json.dumps({"rows": rows, "paths": distributed.paths}), flush=True)
    distributed.finish()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=768, help="hidden size (llama-125m: 768)")
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 64, 512], help="tokens per row (1 = a decode hop)")
    ap.add_argument("--rows", type=int, default=8, help="rows of the microbatch")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)

    runs = [loopback() for _ in range(3)]
    bw, lat = statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)
    print(f"loopback TCP between two processes: {bw / 1e9:.2f} GB/s (median of 3 streams of 512 MiB: "
          + ", ".join(f"{r[0] / 1e9:.2f}" for r in runs) + f"), one-way latency {lat * 1e6:.1f} us "
          "(2,000 one-byte ping-pongs, half the median round trip)")

    import subprocess
    from hexjax.cluster import Cluster
    from hexjax.search.cost import LINK_EFFICIENCY, hop_s

    cluster = Cluster.from_dict({"network": {"bandwidth_GBps": bw / 1e9, "latency_us": lat * 1e6},
                                 "host": [{"name": "p0", "device": "A100-40G", "count": 1},
                                          {"name": "p1", "device": "A100-40G", "count": 1}]})
    argv = [sys.executable, os.path.abspath(__file__), "--child", "--hidden", str(args.hidden), "--rows",
            str(args.rows), "--repeats", str(args.repeats), "--tokens", *map(str, args.tokens)]
    run = subprocess.run([sys.executable, "-c", "from hexjax.cli import main; main()", "launch", "-n", "2", "-k", "1",
                          "--heartbeat", "30", "--timeout", "900", "--", *argv], capture_output=True, text=True)
    if run.returncode != 0:
        raise SystemExit(f"the two-process run failed (exit {run.returncode}):\n{run.stderr[-3000:]}")
    text = run.stdout
    res = json.loads(next(ln for ln in text.splitlines() if ln.startswith("RESULT ")).split(" ", 1)[1])
    link_bw, link_lat = cluster.bandwidth(0, 1), cluster.latency(0, 1)
    print(f"cost model: hop_s(bytes, {link_bw / 1e9:.2f} GB/s, {link_lat * 1e6:.1f} us) with link efficiency "
          f"{LINK_EFFICIENCY}")
    print(f"{'activation [rows, tokens, hidden]':>34} {'bytes':>11} {'measured hop':>13} {'predicted':>11} "
          f"{'measured/pred':>13} {'eff. GB/s':>9} {'host path':>11}")
    for r in res["rows"]:
        pred = hop_s(r["bytes"], link_bw, link_lat)
        print(f"{str(r['shape']):>34} {r['bytes']:>11,} {r['direct_s'] * 1e3:>10.3f} ms {pred * 1e3:>8.3f} ms "
              f"{r['direct_s'] / pred:>13.1f} {r['bytes'] / r['direct_s'] / 1e9:>9.3f} "
              f"{r['host_s'] * 1e3:>8.2f} ms")
    print("moves per path (process 0): " + ", ".join(f"{k}={v}" for k, v in sorted(res["paths"].items())))


if __name__ == "__main__":
    main()
