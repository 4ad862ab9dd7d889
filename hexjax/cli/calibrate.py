"""``hexjax calibrate``: measure the local devices and write a device profile."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import typer


def calibrate_cmd(out: Path | None, quick: bool, model: str, dtypes: str | None, name: str | None,
                  price: float, as_json: bool, serving: bool = True) -> None:
    from hexjax.calibrate import DTYPES, calibrate
    from hexjax.cluster import Cluster
    from hexjax.errors import ConfigError

    if out is not None and out.is_dir():
        raise ConfigError(f"--out {out} is a directory. Fix: give a file path such as {out / 'profile.toml'}")
    chosen = None
    if dtypes is not None:
        chosen = tuple(d.strip() for d in dtypes.split(",") if d.strip())
        bad = [d for d in chosen if d not in DTYPES]
        if not chosen or bad:
            raise ConfigError(f"--dtypes {dtypes!r}: unknown dtype {', '.join(bad) or '(none given)'}. "
                              f"Fix: a comma-separated list of {', '.join(DTYPES)}")
    if price < 0:
        raise ConfigError(f"--price {price}: a price per hour cannot be negative. Fix: give 0 or more")
    say = (lambda m: None) if as_json else (lambda m: typer.echo(f"  measuring {m} ...", err=True))
    cal = calibrate(quick, model=model, dtypes=chosen, name=name, price_per_hour=price, progress=say,
                    serving=serving)
    text = cal.to_toml()
    Cluster.from_dict(__import__("tomllib").loads(text), source="<calibration>")   # what we write must load
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text, encoding="utf-8")
    spec = cal.device_spec()
    bw, lat = cal.link()
    if as_json:
        typer.echo(json.dumps({
            "name": cal.name, "device_kind": cal.device_kind, "num_devices": cal.num_devices,
            "peak_flops": spec.peak_flops, "memory_bandwidth_Bps": spec.memory_bandwidth_Bps,
            "link_bandwidth_Bps": bw, "link_latency_s": lat, "host_to_device_Bps": cal.h2d_Bps,
            "device_to_host_Bps": cal.d2h_Bps, "stage_copy_latency_s": cal.copy_latency_s,
            "stage_copy_Bps": cal.copy_Bps, "host_pass_s": spec.profile.host_pass_s,
            "host_row_s": spec.profile.host_row_s,
            "serving_steps": [{"rows": r, "step_s": st, "program_s": pr} for r, st, pr in cal.serving],
            "stage_overhead_s": dict(spec.profile.stage_overhead_s), "allreduce_s": dict(spec.profile.allreduce_s),
            "chunk_key_s": dict(spec.profile.chunk_key_s), "chained_copy_s": spec.profile.chained_copy_s,
            "stage_runs": [dataclasses.asdict(r) for r in cal.stages],
            "stage_chains": [{"meshes": m, "chain_s": c, "alone_s": a, "copies": k} for m, c, a, k in cal.chains],
            "matmul": [{"dtype": d, "rows": r, "k": k, "flops_per_s": f} for d, r, k, f in cal.matmul],
            "layers": [{"phase": r.phase, "batch": r.batch, "context": r.context, "dtype": r.dtype,
                        "measured_s": r.seconds, "predicted_s": cal.predicted_layer_s(r, spec)} for r in cal.layers],
            "flops_efficiency": {k: v for k, v in spec.profile.flops_efficiency},
            "out": str(out) if out is not None else None}, indent=2))
        return
    from rich.table import Table

    from hexjax.cli._console import table_console
    con = table_console()
    con.print(f"{cal.device_kind} x {cal.num_devices} ({cal.source})")
    con.print(f"matmul peak {spec.peak_flops / 1e9:.4g} GFLOP/s; memory read {spec.memory_bandwidth_Bps / 1e9:.4g} GB/s; "
              f"host->device {cal.h2d_Bps / 1e9:.3g} GB/s, device->host {cal.d2h_Bps / 1e9:.3g} GB/s"
              + (f"; all-reduce link {bw / 1e9:.3g} GB/s, {lat * 1e6:.3g} us" if cal.allreduce else ""))
    t = Table(title=f"decoder layer of {cal.model}: measured vs the calibrated cost model")
    for col in ("phase", "dtype", "batch", "tokens / context", "measured ms", "model ms"):
        t.add_column(col, justify="left" if col in ("phase", "dtype") else "right")
    for r in cal.layers:
        t.add_row(r.phase, r.dtype, str(r.batch), str(r.context), f"{r.seconds * 1e3:.3f}",
                  f"{cal.predicted_layer_s(r, spec) * 1e3:.3f}")
    con.print(t)
    if cal.serving:
        con.print(f"serving engine host work: {spec.profile.host_pass_s * 1e6:.3g} us per pass + "
                  f"{spec.profile.host_row_s * 1e6:.3g} us per row (decode steps, rows: step vs program alone: "
                  + ", ".join(f"{r}: {st * 1e3:.3f} vs {pr * 1e3:.3f} ms" for r, st, pr in cal.serving) + ")")
    if cal.copy_Bps:
        con.print(f"copies between stages: {cal.copy_latency_s * 1e6:.3g} us + bytes at {cal.copy_Bps / 1e9:.3g} GB/s")
    prof = spec.profile
    if prof.stage_overhead_s:
        by = (lambda table, scale=1e6: ", ".join(f"{n}: {v * scale:.3g}" for n, v in table) or "-")
        con.print(f"by devices of a stage's mesh: stage program overhead (us) {by(prof.stage_overhead_s)}; "
                  f"all-reduce inside a program (us) {by(prof.allreduce_s)}; chunk attention per table key "
                  f"(ns) {by(prof.chunk_key_s, 1e9)}; a copy issued behind a stage program "
                  f"{prof.chained_copy_s * 1e6:.3g} us")
    curves = "; ".join(f"{k}: " + ", ".join(f"{int(rows)} rows {e:.2f}" for rows, e in pts)
                       for k, pts in spec.profile.flops_efficiency)
    con.print(f"efficiency vs rows: {curves}")
    if out is not None:
        con.print(f"wrote {out}: a cluster file of this host; other cluster files use its device with "
                  f"profiles = [\"{out.name}\"] and device = \"{cal.name}\"")


def register(app: typer.Typer) -> None:
    @app.command("calibrate")
    def calibrate(
        out: Path | None = typer.Option(None, "--out", help="Write the device profile (a cluster TOML) here."),
        quick: bool = typer.Option(False, "--quick", metavar="", help="Fewer, smaller benchmarks (seconds)."),
        model: str = typer.Option("llama-125m", "--model", help="Model whose decoder layer is timed."),
        dtypes: str | None = typer.Option(None, "--dtypes", help="Comma-separated: float32,bfloat16 "
                                                                 "(default: both; float32 with --quick)."),
        name: str | None = typer.Option(None, "--name", help="Device name in the profile (default local-<kind>)."),
        price: float = typer.Option(0.0, "--price", help="Price per device-hour written into the profile."),
        serving: bool = typer.Option(True, "--serving/--no-serving",
                                     help="Also measure the serving engine's host work per step, the copies "
                                          "between stages, and the runtime's stage programs, all-reduces and "
                                          "chained copies by mesh size (what `hexjax simulate` adds to a step)."),
        as_json: bool = typer.Option(False, "--json", metavar="", help="Print one JSON object."),
    ) -> None:
        """Measure the local devices (matmul, memory, one layer, all-reduce, copies, the serving engine's host
        work) into a device profile."""
        calibrate_cmd(out, quick, model, dtypes, name, price, as_json, serving)
