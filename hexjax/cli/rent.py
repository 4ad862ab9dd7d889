"""``hexjax rent`` (also ``hexjax plan --rent``): the cheapest devices to rent from an offers file, and the plan."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from hexjax.errors import ConfigError


def parse_batches(text: str | int | None) -> tuple[int, ...]:
    """``--batch`` as one size or a comma-separated list of sizes a replica may run at."""
    from hexjax.search.rent import DEFAULT_BATCHES
    if text is None:
        return DEFAULT_BATCHES
    if isinstance(text, int):
        text = str(text)
    try:
        sizes = tuple(int(x) for x in str(text).split(",") if x.strip())
    except ValueError:
        sizes = ()
    if not sizes or min(sizes) < 1:
        raise ConfigError(f"--batch {text!r}: give positive integers, e.g. --batch 8 or --batch 1,4,16")
    return sizes


def rent_cmd(offers_file: Path, model: str, prompt_len: int | None, output_len: int | None,
             trace_file: Path | None, batch: str | int | None, rate: float | None, slo_ms: float | None,
             max_stages: int | None, out: Path | None, as_json: bool, tpot_slo_ms: float | None = None) -> None:
    from hexjax.cli.plan import check_context, load_config, output_file
    from hexjax.search.rent import Bucket, load_offers, mix_from_trace, price_all, rent

    if rate is None or not rate > 0:
        raise ConfigError("renting needs --rate (requests/s to sustain, above 0); e.g. --rate 2")
    if slo_ms is not None and not slo_ms > 0:
        raise ConfigError(f"--slo-ms {slo_ms}: give a positive number of milliseconds")
    if max_stages is not None and max_stages < 1:
        raise ConfigError(f"--max-stages {max_stages}: give a positive integer")
    if tpot_slo_ms is not None and not tpot_slo_ms > 0:
        raise ConfigError(f"--tpot-slo-ms {tpot_slo_ms}: give a positive number of milliseconds")
    out = output_file(out, "--out")
    cfg = load_config(model)
    offers = load_offers(offers_file)
    if trace_file is not None:
        if prompt_len is not None or output_len is not None:
            raise ConfigError("give either --trace or --prompt-len/--output-len, not both")
        from hexjax.trace import load_trace
        trace = load_trace(trace_file)
        trace.check_model(cfg)
        mix = mix_from_trace(trace)
    else:
        if prompt_len is None or output_len is None:
            raise ConfigError("give --prompt-len and --output-len (or --trace FILE with the request sizes)")
        if prompt_len < 1 or output_len < 1:
            raise ConfigError("--prompt-len and --output-len must be at least 1")
        check_context(cfg, prompt_len, output_len)
        mix = (Bucket(prompt_len, output_len, 1.0),)
    batches = parse_batches(batch)
    slo = slo_ms / 1e3 if slo_ms is not None else None
    result = rent(cfg, offers, mix, rate, slo, batches, max_stages,
                  tpot_slo_s=tpot_slo_ms / 1e3 if tpot_slo_ms is not None else None)
    summary = {
        "offers": offers.name, "model": cfg.name, "rate_per_s": rate, "slo_s": slo,
        "price_per_hour": result.price_per_hour, "price_all_offers_per_hour": price_all(offers),
        "requests_per_s": sum(result.requests_per_s), "requests_per_s_shared_links": sum(result.shared_requests_per_s),
        "latency_s_shared_links": result.shared_latency_s,
        "rent": [{"device": o.device, "zone": o.zone, "devices": n, "of": o.available,
                  "price_per_hour": n * offers.cluster.hosts[offers.offer_of_host.index(k)].device.price_per_hour}
                 for k, (o, n) in enumerate(zip(offers.offers, result.devices)) if n],
        "buckets": [{"prompt_len": b.prompt_len, "output_len": b.output_len, "share": b.share, "batch": bt,
                     "replicas": len(p.replicas), "served_requests_per_s": list(served), "plan": p.to_dict()}
                    for (b, bt, p), served in zip(result.plans, result.served)],
    }
    if out is not None:
        out.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    if as_json:
        typer.echo(json.dumps(summary, indent=2))
        return
    from rich.table import Table

    from hexjax.cli._console import table_console
    from hexjax.plan import format_layers
    con = table_console()
    con.print(f"rent for {rate:g} requests/s of {cfg.name}"
              + (f" within {slo_ms:g} ms" if slo_ms is not None else "") + f" from {offers.name}: "
              f"${result.price_per_hour:.2f}/h (everything on offer: ${price_all(offers):.2f}/h)")
    t = Table(title="devices to rent")
    for col in ("device", "zone", "rent", "of", "$/h"):
        t.add_column(col, justify="left" if col in ("device", "zone") else "right")
    for row in summary["rent"]:
        t.add_row(row["device"], row["zone"], str(row["devices"]), str(row["of"]), f"{row['price_per_hour']:.2f}")
    con.print(t)
    t = Table(title="replicas per request size")
    for col in ("prompt+output", "share", "batch", "replicas", "req/s", "latency s", "serves req/s",
                "stages (host: layers, mesh)"):
        t.add_column(col, justify="left" if col.startswith(("prompt", "stages", "serves")) else "right")
    for (b, bt, p), row in zip(result.plans, summary["buckets"]):
        pred = row["plan"]["prediction"] if "prediction" in row["plan"] else {}
        shapes = {" | ".join(f"{s.host}: {format_layers(*s.layers)} dp{s.dp}xtp{s.tp}" for s in rep.stages)
                  for rep in p.replicas}
        t.add_row(f"{b.prompt_len}+{b.output_len}", f"{b.share:.2f}", str(bt), str(len(p.replicas)),
                  f"{pred.get('requests_per_s', 0.0):.3g}", f"{pred.get('latency_s', 0.0):.3g}",
                  # with sharing a replica also serves other sizes: how much of each
                  "\n".join(f"{v:.3g} of {c.prompt_len}+{c.output_len}"
                            for c, v in zip(mix, row["served_requests_per_s"]) if v > 0),
                  "\n".join(sorted(shapes)))
    con.print(t)
    con.print(f"with network links shared among the replicas crossing them: "
              f"{sum(result.shared_requests_per_s):.3g} requests/s (unshared {sum(result.requests_per_s):.3g}), "
              f"worst latency {result.shared_latency_s:.3g} s")
    if out is not None:
        con.print(f"wrote {out}")


def register(app: typer.Typer) -> None:
    @app.command("rent")
    def rent(
        offers: Path = typer.Argument(..., help="Offers TOML file (examples/offers/)."),
        model: str = typer.Option(..., "--model", help="Preset name or Hugging Face model directory."),
        prompt_len: int | None = typer.Option(None, "--prompt-len", help="Prompt tokens per request."),
        output_len: int | None = typer.Option(None, "--output-len", help="Generated tokens per request."),
        trace: Path | None = typer.Option(None, "--trace", help="Request sizes (.jsonl or .json histogram): "
                                                                "one replica bucket per distinct size."),
        batch: str | None = typer.Option(None, "--batch", help="Batch size(s) a replica may run at, e.g. 1,4,16."),
        rate: float | None = typer.Option(None, "--rate", help="Requests/s to sustain."),
        slo_ms: float | None = typer.Option(None, "--slo-ms", help="Bound on end-to-end latency, milliseconds."),
        tpot_slo_ms: float | None = typer.Option(None, "--tpot-slo-ms", help="Bound on the time per output token, "
                                                                             "milliseconds."),
        max_stages: int | None = typer.Option(None, "--max-stages", help="Longest pipeline (default: automatic)."),
        out: Path | None = typer.Option(None, "--out", help="Write the rental and its plans (JSON) here."),
        as_json: bool = typer.Option(False, "--json", metavar="", help="Print one JSON object."),
    ) -> None:
        """The cheapest devices to rent from OFFERS, and the plan on them, for a rate within an SLO."""
        rent_cmd(offers, model, prompt_len, output_len, trace, batch, rate, slo_ms, max_stages, out, as_json,
                 tpot_slo_ms)
