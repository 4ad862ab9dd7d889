"""Explain a plan: a table of its stages with predicted time and memory, and the totals."""

from __future__ import annotations

from typing import Any

from hexjax.plan import format_layers, format_mesh
from hexjax.search.cost import Prediction

GiB = 2**30


def _ms(x: float) -> str:
    return f"{x * 1e3:,.1f}" if x < 100 else f"{x * 1e3:,.0f}"


def _devices(devs) -> str:
    devs = list(devs)
    if len(devs) > 2 and devs == list(range(devs[0], devs[0] + len(devs))):
        return f"{devs[0]}-{devs[-1]}"
    return ",".join(map(str, devs))


def stage_rows(plan, pred: Prediction, cluster) -> list[dict[str, Any]]:
    """One dict per stage: what the table and ``--json`` show."""
    rows = []
    for i, (rep, rp) in enumerate(zip(plan.replicas, pred.replicas)):
        for j, (st, sp) in enumerate(zip(rep.stages, rp.stages)):
            rows.append({
                "replica": i, "stage": j, "host": sp.host,
                "device": cluster.device(st.devices[0]).name, "devices": list(st.devices),
                "dp": st.dp, "tp": st.tp, "layers": list(st.layers),
                "prefill_s": sp.prefill_s, "decode_s": sp.decode_s, "busy_s": sp.busy_s,
                "memory_bytes": sp.memory_bytes, "capacity_bytes": sp.capacity_bytes,
                "weight_bytes": sp.weight_bytes, "kv_bytes": sp.kv_bytes, "activation_bytes": sp.activation_bytes,
            })
    return rows


def summary(plan, pred: Prediction, cluster, search: bool = True) -> dict[str, Any]:
    """JSON-ready explanation of a plan; ``search=False`` leaves out the search statistics saved in the
    plan (for a plan that was loaded, not searched now)."""
    return {
        "model": plan.model, "objective": plan.objective, "cluster": cluster.name,
        "cluster_fingerprint": cluster.fingerprint(),
        "workload": plan.workload.to_dict() if plan.workload else None,
        "devices_used": len(plan.devices), "devices_total": cluster.num_devices,
        "stages": stage_rows(plan, pred, cluster),
        "prediction": pred.to_dict(),
        "search": (plan.prediction or {}).get("search") if search else None,
        "plan": plan.to_dict(),
    }


def table(plan, pred: Prediction, cluster, title: str | None = None):
    """A rich table of the stages."""
    from rich.table import Table

    t = Table(title=title, show_lines=False, header_style="bold")
    for name, justify in (("rep", "right"), ("st", "right"), ("host (device)", "left"), ("devices", "left"),
                          ("mesh", "center"), ("layers", "left"), ("prefill ms", "right"),
                          ("decode ms", "right"), ("busy s", "right"), ("GiB/device", "right")):
        t.add_column(name, justify=justify, overflow="fold")
    last = None
    for r in stage_rows(plan, pred, cluster):
        mem = r["memory_bytes"] / GiB
        cap = r["capacity_bytes"] / GiB
        colour = "red" if mem > cap else ("yellow" if mem > 0.9 * cap else "green")
        t.add_row(str(r["replica"]) if r["replica"] != last else "", str(r["stage"]),
                  f"{r['host']} ({r['device']})", _devices(r["devices"]), format_mesh(r["dp"], r["tp"]),
                  format_layers(*r["layers"]), _ms(r["prefill_s"]), _ms(r["decode_s"]),
                  f"{r['busy_s']:.2f}", f"[{colour}]{mem:.1f}[/]/{cap:.1f}")
        last = r["replica"]
    return t


def totals_text(plan, pred: Prediction, cluster, search: bool = True) -> str:
    """The predicted totals, one line each; with ``search``, also the statistics of the search that
    made the plan (pass False for a plan that was loaded rather than searched now)."""
    wl = plan.workload
    lines = [
        f"replicas {len(plan.replicas)}, devices used {len(plan.devices)} of {cluster.num_devices}"
        + (f", microbatches per replica {sorted({r.microbatches for r in pred.replicas})}" if pred.replicas else ""),
        f"TTFT {pred.ttft_s * 1e3:,.1f} ms   TPOT {pred.tpot_s * 1e3:,.2f} ms   "
        f"end-to-end latency {pred.latency_s:,.3f} s" + (" (worst replica)" if len(plan.replicas) > 1 else ""),
        f"throughput {pred.throughput_tokens_per_s:,.1f} tokens/s, {pred.requests_per_s:,.3f} requests/s",
        f"price ${pred.price_per_hour:,.2f}/h, {pred.tokens_per_dollar:,.0f} tokens per dollar",
    ]
    if wl is not None:
        checks = []
        if wl.slo_s is not None:
            ok = pred.latency_s <= wl.slo_s
            checks.append(f"SLO {wl.slo_s * 1e3:,.0f} ms: " + ("[green]met[/]" if ok else "[red]missed[/]"))
        if wl.rate_per_s is not None:
            ok = pred.requests_per_s >= wl.rate_per_s
            checks.append(f"rate {wl.rate_per_s:g}/s: " + ("[green]sustained[/]" if ok else "[red]not sustained[/]"))
        if checks:
            lines.append("   ".join(checks))
    search = (plan.prediction or {}).get("search") if search else None
    if search:
        kind = "exhaustive search" if search.get("exhaustive") else "search"
        count = search.get("replicas", search.get("candidates"))
        what = "replicas" if search.get("exhaustive") else "candidate pipelines"
        lines.append(f"{kind} {search['search_s']:.2f} s over {count} {what}, pipelines of at most "
                     f"{search['max_stages']} stages")
    return "\n".join(lines)
