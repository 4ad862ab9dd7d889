"""``hexjax simulate``: a plan serving a request trace, simulated; SLO attainment and latency percentiles."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from hexjax.errors import ConfigError, PlanError


def _rates(text: str | None, base: float | None) -> list[float]:
    if text is None:
        if base is None:
            raise ConfigError("--png draws attainment against rate: give --rate (the curve spans 0.25x to 2x of "
                              "it) or --rates 0.5,1,2")
        return [base * k for k in (0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0)]
    try:
        out = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"--rates {text!r}: give numbers separated by commas, e.g. --rates 0.5,1,2") from None
    if not out or any(not r > 0 for r in out):
        raise ConfigError(f"--rates {text!r}: every rate must be a positive number of requests per second")
    return out


def _slo(latency_ms, ttft_ms, tpot_ms, plan):
    from hexjax.search.simulate import SLO
    for name, v in (("--slo-ms", latency_ms), ("--ttft-slo-ms", ttft_ms), ("--tpot-slo-ms", tpot_ms)):
        if v is not None and not v > 0:
            raise ConfigError(f"{name} must be a positive number of milliseconds, got {v:g}")
    if latency_ms is None and ttft_ms is None and tpot_ms is None and plan.workload and plan.workload.slo_s:
        return SLO(latency_s=plan.workload.slo_s)
    ms = (lambda v: None if v is None else v / 1e3)
    return SLO(ms(latency_ms), ms(ttft_ms), ms(tpot_ms))


def _trace(trace_file: Path | None, rate: float | None, requests: int | None, plan, seed: int):
    from hexjax.trace import Trace, TraceRequest, load_trace
    if requests is not None and requests < 1:
        raise ConfigError(f"--requests must be at least 1, got {requests}")
    if trace_file is None:
        if rate is None:
            raise ConfigError("give the requests: --trace requests.jsonl (with arrival_s, or with --rate), or "
                              "--rate R to send the plan's workload at R requests/s")
        if plan.workload is None:
            raise ConfigError("--rate without --trace sends the plan's workload, but the plan carries none; "
                              "give --trace requests.jsonl (examples under examples/traces/)")
        wl = plan.workload
        return Trace((TraceRequest(wl.prompt_len, wl.output_len),), "the plan's workload").with_rate(
            rate, seed, requests or 200)
    tr = load_trace(trace_file)
    if rate is not None:
        return tr.with_rate(rate, seed, requests)
    if requests is not None:
        raise ConfigError("--requests sets how many requests --rate sends; give --rate too (a trace with "
                          "arrival times is replayed whole)")
    if not tr.timed:
        raise ConfigError(f"{trace_file}: the requests carry no arrival times; give --rate R (Poisson arrivals "
                          "at R requests/s)")
    return tr


def _row(label: str, res) -> dict:
    d = res.to_dict()
    d["label"] = label
    return d


def simulate_cmd(plan_file: Path, cluster_file: Path, model: str | None, trace_file: Path | None,
                 rate: float | None, requests: int | None, slo_ms: float | None, ttft_slo_ms: float | None,
                 tpot_slo_ms: float | None, max_batch: int | None, routing: str, rates: str | None,
                 png: Path | None, seed: int, as_json: bool, step_tokens: int | None = None, engine: bool = False,
                 max_model_len: int | None = None) -> None:
    from hexjax.cli.plan import output_file, plan_model
    from hexjax.cluster import Cluster
    from hexjax.plan import Plan
    from hexjax.search.simulate import (DEFAULT_STEP_TOKENS, attainment_curve, draw_curves, engine_settings,
                                        engine_step_times, simulate_plan)

    if routing not in ("plan", "load"):
        raise ConfigError(f"--routing {routing!r}: use 'plan' (the plan's routing table) or 'load' (any replica)")
    if max_batch is not None and max_batch < 1:
        raise ConfigError(f"--max-batch must be at least 1, got {max_batch}")
    if max_model_len is not None and max_model_len < 1:
        raise ConfigError(f"--max-model-len must be at least 1 token, got {max_model_len}")
    if step_tokens is not None and step_tokens < 1:
        raise ConfigError(f"--step-tokens must be at least 1, got {step_tokens}")
    if rate is not None and not rate > 0:
        raise ConfigError(f"--rate must be a positive number of requests per second, got {rate:g}")
    cluster = Cluster.load(cluster_file)
    plan = Plan.load(plan_file)
    cfg = plan_model(plan, plan_file, model)
    problems = plan.violations(cfg, cluster)
    if problems:
        raise PlanError(f"{plan_file} is not a valid plan for {cfg.name} on {cluster.name}: {problems[0]}"
                        + (f" (and {len(problems) - 1} more; `hexjax explain` lists them)" if len(problems) > 1
                           else ""))
    slo = _slo(slo_ms, ttft_slo_ms, tpot_slo_ms, plan)
    trace = _trace(trace_file, rate, requests, plan, seed)
    output_file(png, "--png")
    curve_rates = _rates(rates, rate if rate is not None else trace.summary().get("rate_per_s")) if png else None
    step_times, shapes = None, None
    if engine or max_model_len is not None:
        # the shapes the serving engine compiles: padded chunk widths and row counts, block tables over the
        # whole context; its defaults for what is not given
        max_batch, length, step_tokens = engine_settings(plan, cfg, max_batch, max_model_len, step_tokens)
        step_times = engine_step_times(plan, cfg, cluster, max_batch, length, step_tokens)
        over = [r for r in trace.requests if r.context_len > length]
        if over:
            raise ConfigError(f"{len(over)} of the {len(trace.requests)} requests need more than the engine's "
                              f"{length} tokens (prompt plus output, up to {max(r.context_len for r in over)}), "
                              "and the engine refuses them; give --max-model-len at least that (at most the "
                              "model's context)")
        shapes = {"max_batch": max_batch, "max_model_len": length, "max_step_tokens": step_tokens}
    elif step_tokens is None:
        step_tokens = DEFAULT_STEP_TOKENS
    res = simulate_plan(plan, cfg, cluster, trace, slo, max_batch=max_batch, routing=routing,
                        max_step_tokens=step_tokens, step_times=step_times)
    written = []
    curve = None
    if png is not None:
        # the same request sizes, arriving at each rate of the curve
        curve = attainment_curve(plan, cfg, cluster, trace, curve_rates, slo, seed=seed, max_batch=max_batch,
                                 routing=routing, max_step_tokens=step_tokens, step_times=step_times)
        written.append(draw_curves({plan_file.name: curve}, png, f"{cfg.name} on {cluster.name}"))
    if as_json:
        d = _row(trace.name, res)
        if curve is not None:
            d["curve"] = [{"rate_per_s": r, "attainment": c.attainment,
                           "throughput_tokens_per_s": c.throughput_tokens_per_s} for r, c in curve]
        d["written"] = written
        d["engine_shapes"] = shapes
        typer.echo(json.dumps(d, indent=2))
        return
    _print(plan_file, cfg, cluster, trace, res, curve, written, shapes)


def _print(plan_file, cfg, cluster, trace, res, curve, written, shapes=None) -> None:
    from rich.table import Table

    from hexjax.cli._console import table_console
    con = table_console()
    d = res.to_dict()
    t = Table(title=f"{plan_file.name}: {cfg.name} on {cluster.name}, {trace.name} (simulated)")
    for col in ("requests", "rejected", "SLO attainment", "tokens/s", "requests/s", "TTFT p50/p99",
                "TPOT p50/p99", "latency p50/p99"):
        t.add_column(col, justify="right")
    ms = (lambda a, b: f"{_seconds(d[a])} / {_seconds(d[b])}")
    t.add_row(str(d["requests"]), str(d["rejected"]), f"{100 * d['attainment']:.1f}%",
              f"{d['throughput_tokens_per_s']:,.1f}", f"{d['requests_per_s']:.3f}",
              ms("ttft_50_s", "ttft_99_s"), ms("tpot_50_s", "tpot_99_s"), ms("latency_50_s", "latency_99_s"))
    con.print(t)
    con.print(f"SLO: {d['slo']}; requests per replica: "
              + ", ".join(f"r{k} {v}" for k, v in d["requests_per_replica"].items()))
    if shapes is not None:
        con.print(f"the serving engine's shapes: {shapes['max_batch']} rows, block tables of "
                  f"{shapes['max_model_len']} tokens, {shapes['max_step_tokens']} tokens a step (padded)")
    if curve is not None:
        con.print("attainment vs rate: " + ", ".join(f"{r:g}/s {100 * c.attainment:.1f}%" for r, c in curve))
    for w in written:
        con.print(f"wrote {w}")


def _seconds(x: float) -> str:
    return "-" if x is None else f"{x * 1e3:.1f} ms" if x < 1 else f"{x:,.2f} s"


def register(app: typer.Typer) -> None:
    @app.command("simulate")
    def simulate(
        plan: Path = typer.Option(..., "--plan", help="Plan JSON."),
        cluster: Path = typer.Option(..., "--cluster", help="Cluster TOML file."),
        model: str | None = typer.Option(
            None, "--model", help="Preset name or Hugging Face model directory (default: the plan's, if a preset)."),
        trace: Path | None = typer.Option(None, "--trace", help="Requests: .jsonl (prompt_len, output_len, "
                                                                "arrival_s) or a .json histogram."),
        rate: float | None = typer.Option(None, "--rate", help="Poisson arrivals at this many requests/s."),
        requests: int | None = typer.Option(None, "--requests", help="How many requests --rate sends."),
        slo_ms: float | None = typer.Option(None, "--slo-ms", help="End-to-end latency SLO, milliseconds."),
        ttft_slo_ms: float | None = typer.Option(None, "--ttft-slo-ms", help="Time-to-first-token SLO, ms."),
        tpot_slo_ms: float | None = typer.Option(None, "--tpot-slo-ms", help="Time-per-output-token SLO, ms."),
        max_batch: int | None = typer.Option(None, "--max-batch", help="Slots per replica (default: the "
                                                                       "plan's batch; with --engine the "
                                                                       "engine's, 32 rounded up to the dp)."),
        routing: str = typer.Option("plan", "--routing", help="plan (its routing table, if any) or load."),
        rates: str | None = typer.Option(None, "--rates", help="Rates of the --png curve, e.g. 0.5,1,2."),
        png: Path | None = typer.Option(None, "--png", help="Save SLO attainment against rate to this PNG."),
        step_tokens: int | None = typer.Option(
            None, "--step-tokens", help="Tokens one iteration feeds per replica (decode rows plus prefill "
            "chunks; default 2048, with --engine the engine's max(512, 2 x max-batch))."),
        engine: bool = typer.Option(
            False, "--engine", metavar="", help="Cost the shapes the serving engine (`hexjax serve`) compiles: prefill "
            "chunks padded to its widths, rows to its row counts, block tables over --max-model-len; with its "
            "defaults for --max-batch and --step-tokens."),
        max_model_len: int | None = typer.Option(
            None, "--max-model-len", help="The engine's longest prompt plus output: its block tables' span "
            "(default: the model's context; implies --engine)."),
        seed: int = typer.Option(0, "--seed", help="Seed of the Poisson arrivals."),
        as_json: bool = typer.Option(False, "--json", metavar="", help="Print one JSON object."),
    ) -> None:
        """Simulate a plan serving requests with continuous batching: SLO attainment, TTFT/TPOT, throughput."""
        simulate_cmd(plan, cluster, model, trace, rate, requests, slo_ms, ttft_slo_ms, tpot_slo_ms, max_batch,
                     routing, rates, png, seed, as_json, step_tokens, engine, max_model_len)
