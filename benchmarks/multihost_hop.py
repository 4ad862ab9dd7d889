"""The cross-process activation hop on loopback, measured, beside the cost model's prediction.

Two ``jax.distributed`` processes (``hexjax launch`` machinery, one CPU device each,
gloo + cross-host transfer sockets on 127.0.0.1) move a float32 activation
``[rows, tokens, hidden]`` from process 0's device to process 1's and back with
``hexjax.runtime.distributed.move`` (the path a pipeline hop takes). A hop is half
the median round trip (``--stat min``: the shortest, which other load on the machine
disturbs least).

Loopback itself is measured first, without JAX: one process streams 512 MiB
through a TCP socket on 127.0.0.1 to another (``sendall`` / ``recv_into`` with
4 MiB buffers; median of three) for the bandwidth, and 2,000 one-byte ping-pongs
give the latency (half the median round trip). A two-host cluster whose network is that bandwidth and
latency gives ``hexjax.search.cost.hop_s`` for the same bytes: the bandwidth-only prediction.

A hop also has a fixed cost that the socket figures lack (the transfer's set-up on both processes,
the handoff program), so the measured hops are fitted with ``time = latency + bytes / bandwidth``
(least squares on relative error, so small and large hops weigh alike) on every ``--fit-every``-th
size, the smallest and largest included; the other sizes are held out. A second cluster describes
the link with the fitted latency and bandwidth (its ``bandwidth_GBps`` is the fitted one over
``LINK_EFFICIENCY``, which ``hop_s`` applies), and both descriptions' predictions are printed beside
every measurement, with the held-out sizes marked.

The host path (through the coordination service's key-value store, used for
stages that span processes) is timed on the same sizes for comparison.

    python benchmarks/multihost_hop.py [--hidden 768] [--tokens 1 4 16 64 128 256 512 1024] [--rows 8]
                                       [--repeats 7] [--fit-every 2] [--stat median|min]
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
                     "direct_s": statistics.median(times["direct"]), "direct_min_s": min(times["direct"]),
                     "host_s": statistics.median(times["host"])})
    if me == 0:
        print("RESULT " + json.dumps({"rows": rows, "paths": distributed.paths}), flush=True)
    distributed.finish()


def fit_hop(sizes: list[float], times: list[float]) -> tuple[float, float]:
    """``(latency_s, bandwidth_Bps)`` of ``time = latency + bytes / bandwidth`` by least squares on the
    relative error ``(predicted - measured) / measured``."""
    import numpy as np
    b, t = np.asarray(sizes, float), np.asarray(times, float)
    if len(b) < 2 or len(set(b)) < 2:
        raise SystemExit("the fit needs at least two different sizes (--tokens, --fit-every)")
    (lat, per_byte), *_ = np.linalg.lstsq(np.stack([1 / t, b / t], axis=1), np.ones_like(t), rcond=None)
    if per_byte <= 0:
        raise SystemExit(f"the fit gives no positive bandwidth (slope {per_byte:.3g} s/B): the hop times do not "
                         "grow with the bytes; use larger --tokens")
    return float(lat), float(1 / per_byte)


def fit_indices(n: int, every: int) -> list[int]:
    """Every ``every``-th of ``n`` sizes, with the first and the last."""
    return sorted(set(range(0, n, max(every, 1))) | {0, n - 1})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=768, help="hidden size (llama-125m: 768)")
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 4, 16, 64, 128, 256, 512, 1024],
                    help="tokens per row (1 = a decode hop), one size per value")
    ap.add_argument("--rows", type=int, default=8, help="rows of the microbatch")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--fit-every", type=int, default=2,
                    help="fit on every K-th size (plus the first and last); the others are held out")
    ap.add_argument("--stat", choices=("median", "min"), default="median",
                    help="statistic of the repeats taken as the hop (min: the least disturbed by other load)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)
    args.tokens = sorted(set(args.tokens))
    if len(args.tokens) < 2:
        raise SystemExit("give at least two --tokens sizes to fit a latency and a bandwidth")

    runs = [loopback() for _ in range(3)]
    bw, lat = statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)
    print(f"loopback TCP between two processes: {bw / 1e9:.2f} GB/s (median of 3 streams of 512 MiB: "
          + ", ".join(f"{r[0] / 1e9:.2f}" for r in runs) + f"), one-way latency {lat * 1e6:.1f} us "
          "(2,000 one-byte ping-pongs, half the median round trip)")

    import subprocess
    from hexjax.cluster import Cluster
    from hexjax.search.cost import LINK_EFFICIENCY, hop_s

    def two_hosts(bandwidth_GBps: float, latency_us: float) -> Cluster:
        return Cluster.from_dict({"network": {"bandwidth_GBps": bandwidth_GBps, "latency_us": latency_us},
                                  "host": [{"name": "p0", "device": "A100-40G", "count": 1},
                                           {"name": "p1", "device": "A100-40G", "count": 1}]})

    cluster = two_hosts(bw / 1e9, lat * 1e6)
    argv = [sys.executable, os.path.abspath(__file__), "--child", "--hidden", str(args.hidden), "--rows",
            str(args.rows), "--repeats", str(args.repeats), "--tokens", *map(str, args.tokens)]
    run = subprocess.run([sys.executable, "-c", "from hexjax.cli import main; main()", "launch", "-n", "2", "-k", "1",
                          "--heartbeat", "30", "--timeout", "900", "--", *argv], capture_output=True, text=True)
    if run.returncode != 0:
        raise SystemExit(f"the two-process run failed (exit {run.returncode}):\n{run.stderr[-3000:]}")
    text = run.stdout
    res = json.loads(next(ln for ln in text.splitlines() if ln.startswith("RESULT ")).split(" ", 1)[1])
    rows = res["rows"]
    for r in rows:   # the measured hop: median or minimum of the repeats' half round trips
        r["hop_s"] = r["direct_s"] if args.stat == "median" else r["direct_min_s"]
    link_bw, link_lat = cluster.bandwidth(0, 1), cluster.latency(0, 1)

    fitted = fit_indices(len(rows), args.fit_every)
    fit_lat, fit_bw = fit_hop([rows[i]["bytes"] for i in fitted], [rows[i]["hop_s"] for i in fitted])
    held = [i for i in range(len(rows)) if i not in fitted]
    print(f"fit of the measured hop ({args.stat} of {args.repeats} round trips / 2) on {len(fitted)} sizes (" + ", ".join(f"{rows[i]['bytes']:,} B" for i in fitted)
          + f"): time = {fit_lat * 1e3:.3f} ms + bytes / {fit_bw / 1e9:.3f} GB/s; held out: "
          + (", ".join(f"{rows[i]['bytes']:,} B" for i in held) or "none"))
    described = two_hosts(fit_bw / LINK_EFFICIENCY / 1e9, fit_lat * 1e6)
    new_bw, new_lat = described.bandwidth(0, 1), described.latency(0, 1)
    print(f"links: bandwidth-only = [network] bandwidth_GBps = {link_bw / 1e9:.3f}, latency_us = "
          f"{link_lat * 1e6:.1f} (loopback's socket figures); fitted = [network] bandwidth_GBps = "
          f"{new_bw / 1e9:.3f}, latency_us = {new_lat * 1e6:.1f} (hop_s applies LINK_EFFICIENCY {LINK_EFFICIENCY})")
    print(f"{'activation [rows, tokens, hidden]':>34} {'bytes':>11} {'set':>4} {'measured':>10} "
          f"{'bw-only pred':>12} {'meas/pred':>9} {'fitted pred':>12} {'meas/pred':>9} {'eff. GB/s':>9} "
          f"{'host path':>11}")
    errors = {"fit": [], "held out": []}
    for i, r in enumerate(rows):
        old_pred = hop_s(r["bytes"], link_bw, link_lat)
        new_pred = hop_s(r["bytes"], new_bw, new_lat)
        role = "fit" if i in fitted else "held out"
        errors[role].append(abs(r["hop_s"] / new_pred - 1))
        print(f"{str(r['shape']):>34} {r['bytes']:>11,} {'fit' if i in fitted else 'held':>4} "
              f"{r['hop_s'] * 1e3:>7.3f} ms {old_pred * 1e3:>9.3f} ms {r['hop_s'] / old_pred:>9.2f} "
              f"{new_pred * 1e3:>9.3f} ms {r['hop_s'] / new_pred:>9.2f} {r['bytes'] / r['hop_s'] / 1e9:>9.3f} "
              f"{r['host_s'] * 1e3:>8.2f} ms")
    print("fitted link, |measured/predicted - 1|: " + "; ".join(
        f"{k} sizes max {max(v) * 100:.1f}%, mean {statistics.mean(v) * 100:.1f}%" for k, v in errors.items() if v))
    print("moves per path (process 0): " + ", ".join(f"{k}={v}" for k, v in sorted(res["paths"].items())))


if __name__ == "__main__":
    main()
