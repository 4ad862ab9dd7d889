"""``hexjax cluster show FILE`` and ``hexjax devices``: look at hardware descriptions."""

from __future__ import annotations

import json
import math
from pathlib import Path

import typer

GiB = 2**30


def _bandwidth(bps: float) -> str:
    if math.isinf(bps):
        return "-"
    return f"{bps / 1e9:.3g} GB/s"


def _latency(s: float) -> str:
    if s >= 1e-3:
        return f"{s * 1e3:.3g} ms"
    return f"{s * 1e6:.3g} us"


def _memory(n: float) -> str:
    return f"{n / GiB / 1024:.2f} TiB" if n >= 1024 * GiB else f"{n / GiB:.4g} GiB"


def _link_table(title: str, names: list[str], bw, lat, *, numbered: bool = False):
    """Square table; with ``numbered`` rows and columns are just ``#k`` (the host table's numbers)."""
    from rich.table import Table
    table = Table(title=title, show_lines=True)
    table.add_column("", style="bold", overflow="fold")
    for a in range(len(names)):
        table.add_column(f"#{a}" if numbered else names[a], justify="center", overflow="fold", min_width=6)
    for a, row_name in enumerate(names):
        table.add_row(f"#{a}" if numbered else row_name,
                      *(f"{bw(a, b) / 1e9:.3g}\n{_latency(lat(a, b))}" for b in range(len(names))))
    return table


def show(file: Path, as_json: bool = False) -> None:
    """Print a cluster's hosts, totals and the links between its hosts."""
    from rich.console import Console
    from rich.table import Table

    from hexjax.cluster import Cluster

    c = Cluster.load(file)
    console = Console()
    if as_json:
        summary = {
            "name": c.name, "source": c.source, "fingerprint": c.fingerprint(),
            "num_devices": c.num_devices, "total_memory_bytes": c.total_memory_bytes,
            "total_peak_flops": c.total_peak_flops, "price_per_hour": c.price_per_hour,
            "cluster": c.to_dict(),
        }
        typer.echo(json.dumps(summary, indent=2))
        return

    hosts = Table(
        title=f"cluster {c.name} ({c.source}), fingerprint {c.fingerprint()}",
        caption=(f"total: {c.num_devices} devices on {len(c.hosts)} hosts in {len(c.zones)} zone(s), "
                 f"{_memory(c.total_memory_bytes)}, {c.total_peak_flops / 1e15:.3g} PFLOP/s peak, "
                 f"${c.price_per_hour:.2f}/h. Memory, TFLOP/s and GB/s are per device; $/h per host."))
    for col, justify in (("#", "right"), ("host", "left"), ("zone", "left"), ("device", "left"), ("count", "right"),
                         ("ids", "right"), ("memory", "right"), ("TFLOP/s", "right"),
                         ("GB/s", "right"), ("$/h", "right")):
        hosts.add_column(col, justify=justify, overflow="fold")
    for k, h in enumerate(c.hosts):
        d = h.device
        hosts.add_row(str(k), h.name, h.zone, d.name, str(h.count), f"{h.first_device}-{h.first_device + h.count - 1}",
                      _memory(d.memory_bytes), f"{d.peak_flops / 1e12:.4g}", f"{d.memory_bandwidth_Bps / 1e9:.4g}",
                      f"{h.count * d.price_per_hour:.2f}")
    console.print(hosts)

    if len(c.hosts) <= 12:
        console.print(_link_table("links between hosts: GB/s per direction over one-way latency (diagonal: inside the host)",
                                  [h.name for h in c.hosts], c.host_bandwidth, c.host_latency, numbered=True))
        return
    # Too many hosts for one matrix: show the zone defaults and list the overrides.
    zones = list(c.zones)
    same = lambda a, b: a == b  # noqa: E731
    console.print(_link_table(
        "default links between hosts, by zone: GB/s per direction over one-way latency", zones,
        lambda a, b: c.network_bandwidth_Bps if same(a, b) else c.cross_zone_bandwidth_Bps,
        lambda a, b: c.network_latency_s if same(a, b) else c.cross_zone_latency_s))
    special = Table(title="hosts and pairs that differ from the defaults")
    for col in ("between", "and", "bandwidth", "latency"):
        special.add_column(col, overflow="fold")
    for link in c.links:
        special.add_row(link.a, link.b, _bandwidth(link.bandwidth_Bps), _latency(link.latency_s))
    for h in c.hosts:
        if h.intra_bandwidth_Bps != h.device.intra_bandwidth_Bps or h.intra_latency_s != 5e-6:
            special.add_row(h.name, "(inside)", _bandwidth(h.intra_bandwidth_Bps), _latency(h.intra_latency_s))
    if special.row_count:
        console.print(special)


def devices(
    as_json: bool = typer.Option(False, "--json", metavar="", help="Print one JSON object instead of a table."),
) -> None:
    """List the device catalogue."""
    from rich.console import Console
    from rich.table import Table

    from hexjax.devices import DEVICES

    if as_json:
        typer.echo(json.dumps({"devices": [
            {"name": d.name, "kind": d.kind, "memory_bytes": d.memory_bytes, "peak_flops": d.peak_flops,
             "memory_bandwidth_Bps": d.memory_bandwidth_Bps, "intra_bandwidth_Bps": d.intra_bandwidth_Bps,
             "price_per_hour": d.price_per_hour} for d in DEVICES.values()]}, indent=2))
        return

    table = Table(title="device catalogue (dense bf16/fp16 tensor peak; link: inside one host, per direction)")
    for col, justify in (("name", "left"), ("kind", "left"), ("memory", "right"), ("TFLOP/s", "right"),
                         ("mem GB/s", "right"), ("link GB/s", "right"), ("$/h", "right")):
        table.add_column(col, justify=justify, overflow="fold")
    for d in DEVICES.values():
        table.add_row(d.name, d.kind, _memory(d.memory_bytes), f"{d.peak_flops / 1e12:.4g}",
                      f"{d.memory_bandwidth_Bps / 1e9:.4g}", f"{d.intra_bandwidth_Bps / 1e9:.4g}",
                      f"{d.price_per_hour:.2f}")
    Console().print(table)


def register(app: typer.Typer) -> None:
    cluster_app = typer.Typer(help="Inspect cluster description files.", no_args_is_help=True)

    @cluster_app.command("show")
    def show_command(
        file: Path = typer.Argument(..., help="Cluster TOML file, e.g. examples/clusters/hexgen-8gpu.toml."),
        as_json: bool = typer.Option(False, "--json", metavar="", help="Print a JSON summary instead of tables."),
    ) -> None:
        """Show a cluster's hosts, totals and link matrix."""
        show(file, as_json)

    app.add_typer(cluster_app, name="cluster")
    app.command("devices")(devices)
