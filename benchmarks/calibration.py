"""The cost model against the real single-device runtime, before and after calibrating this machine.

Calibrates the local device (``hexjax.calibrate``: matmuls, streaming reads, decoder layers of the model,
program launch), then times whole-model generation through the runtime's jitted prefill and decode loop
(random weights; the shapes in turns, the fastest run of each counting) and prints, per shape, measured
vs predicted prefill and decode step with the error of the datasheet-constant model (the device's
calibrated peaks, without the profile's efficiencies) and of the calibrated one. With ``--rounds``,
calibration and measurement alternate, each keeping its best figures; the calibration never sees the
generation runs.

    python benchmarks/calibration.py [--model llama-125m] [--quick] [--repeats 5] [--rounds 3] [--shapes 1x96x24,4x64x16]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="llama-125m")
    ap.add_argument("--quick", action="store_true", help="calibrate with the --quick benchmarks")
    ap.add_argument("--repeats", type=int, default=5, help="timed runs per measurement (fastest counts)")
    ap.add_argument("--shapes", default="1x96x24,1x256x32,4x64x16", help="batch x prompt x new tokens, comma-separated")
    ap.add_argument("--rounds", type=int, default=1,
                    help="alternate calibration and measurement this many times, keeping each one's best figures")
    args = ap.parse_args()

    import jax

    from hexjax.calibrate import FULL, QUICK, calibrate, generation_timer, predict_generation
    from hexjax.models.config import ModelConfig

    cfg = ModelConfig.preset(args.model)
    t0 = time.perf_counter()
    shapes = dataclasses.replace(QUICK if args.quick else FULL, repeats=args.repeats)
    runs = [tuple(int(x) for x in shape.split("x")) for shape in args.shapes.split(",")]
    timers = {shape: generation_timer(cfg, *shape) for shape in runs}
    cal, measured, loads = None, {shape: (float("inf"), float("inf")) for shape in runs}, []
    for _ in range(args.rounds):
        c = calibrate(args.quick, model=cfg, shapes=shapes, serving=False)   # single-device figures only
        cal = c if cal is None else cal.best_of(c)
        for _ in range(args.repeats):     # the shapes in turns: each meets the quieter moments as often
            for shape, run in timers.items():
                m, old = run(), measured[shape]
                measured[shape] = (min(old[0], m[0]), min(old[1], m[1]))
        loads.append(os.getloadavg()[0])
    spec = cal.device_spec()
    plain = dataclasses.replace(spec, profile=None)
    print(f"{jax.devices()[0].device_kind}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}; "
          f"{args.rounds} round(s) in {time.perf_counter() - t0:.1f} s: matmul peak {spec.peak_flops / 1e9:.3g} "
          f"GFLOP/s, read {spec.memory_bandwidth_Bps / 1e9:.3g} GB/s, launch {spec.profile.step_overhead_s * 1e6:.3g} us")
    print(f"model {cfg.name} float32; errors are predicted / measured - 1; 'datasheet' = the same peaks with the "
          f"constant efficiencies ({plain.name}, no profile)")
    print(f"{'shape':>12s} {'phase':>8s} {'measured':>10s} {'datasheet':>10s} {'err':>6s} {'calibrated':>10s} {'err':>6s}")
    for (b, s, n), meas in measured.items():
        shape = f"{b}x{s}x{n}"
        before = predict_generation(cfg, plain, b, s, n)
        after = predict_generation(cfg, spec, b, s, n)
        for k, phase in enumerate(("prefill", "decode")):
            m, p0, p1 = meas[k], before[k], after[k]
            print(f"{shape:>12s} {phase:>8s} {m * 1e3:8.2f}ms {p0 * 1e3:8.2f}ms {p0 / m - 1:+6.0%} "
                  f"{p1 * 1e3:8.2f}ms {p1 / m - 1:+6.0%}")
    print("load average after each round: " + ", ".join(f"{x:.1f}" for x in loads))


if __name__ == "__main__":
    main()
