"""``hexjax plan --task train`` and ``hexjax explain`` of a training plan."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import typer

from hexjax.errors import ConfigError

GiB = 2**30


def register(app: typer.Typer) -> None:
    """The options live on ``hexjax plan`` and ``hexjax explain`` (see ``hexjax.cli.plan``)."""


def parse_microbatches(text: str | None) -> tuple[int, ...] | None:
    """``"1,2,4"`` -> ``(1, 2, 4)``; refuses anything but positive integers."""
    if text is None:
        return None
    try:
        values = tuple(int(x) for x in text.replace(" ", "").split(",") if x)
    except ValueError:
        values = ()
    if not values or min(values) < 1:
        raise ConfigError(f"--microbatches {text!r}: give positive integers separated by commas, e.g. 1,2,4,8")
    return values


def train_workload(seq_len: int | None, global_batch: int | None, microbatches: str | None, remat: str | None,
                   dtype: str | None, base=None):
    from hexjax.workload import DEFAULT_MICROBATCHES, TrainWorkload
    if base is None and (seq_len is None or global_batch is None):
        raise ConfigError("a training plan needs --seq-len N and --global-batch N (sequences per step)")
    mbs = parse_microbatches(microbatches)
    return TrainWorkload(
        seq_len=seq_len if seq_len is not None else base.seq_len,
        global_batch=global_batch if global_batch is not None else base.global_batch,
        microbatches=mbs if mbs is not None else (base.microbatches if base else DEFAULT_MICROBATCHES),
        remat=remat if remat is not None else (base.remat if base else "none"),
        dtype=dtype if dtype is not None else (base.dtype if base else "bfloat16"))


def check_seq_len(cfg, wl) -> None:
    if wl.seq_len > cfg.max_position_embeddings:
        raise ConfigError(f"--seq-len {wl.seq_len} exceeds {cfg.name}'s {cfg.max_position_embeddings} positions "
                          f"(max_position_embeddings); use --seq-len {cfg.max_position_embeddings} or less")


# ---- output ----

def stage_rows(plan, pred, cluster) -> list[dict[str, Any]]:
    rows = []
    for i, (rep, rp) in enumerate(zip(plan.replicas, pred.replicas)):
        for j, (st, sp) in enumerate(zip(rep.stages, rp.stages)):
            rows.append({
                "replica": i, "stage": j, "host": sp.host, "device": cluster.device(st.devices[0]).name,
                "devices": list(st.devices), "dp": st.dp, "tp": st.tp, "layers": list(st.layers),
                "rows": rp.rows, "microbatch": rp.microbatch,
                "compute_s": sp.compute_s, "comm_s": sp.comm_s, "bubble_s": sp.bubble_s,
                "param_bytes": sp.param_bytes, "grad_bytes": sp.grad_bytes, "optimizer_bytes": sp.optimizer_bytes,
                "stash_bytes": sp.stash_bytes, "stash_microbatches": sp.stash_microbatches,
                "workspace_bytes": sp.workspace_bytes, "memory_bytes": sp.memory_bytes,
                "capacity_bytes": sp.capacity_bytes,
            })
    return rows


def _ms(x: float) -> str:
    return f"{x * 1e3:,.1f}" if x < 100 else f"{x * 1e3:,.0f}"


def table(plan, pred, cluster, title: str):
    from rich.table import Table

    from hexjax.plan import format_layers, format_mesh
    t = Table(title=title, header_style="bold")
    for name, justify in (("rep", "right"), ("st", "right"), ("host", "left"), ("mesh", "center"),
                          ("layers", "left"), ("rows", "right"), ("comp ms", "right"), ("comm ms", "right"),
                          ("bubble ms", "right"), ("params", "right"), ("grads", "right"), ("optim", "right"),
                          ("stash (mb)", "right"), ("work", "right"), ("GiB/device", "right")):
        t.add_column(name, justify=justify, overflow="fold")
    last = None
    for r in stage_rows(plan, pred, cluster):
        mem, cap = r["memory_bytes"] / GiB, r["capacity_bytes"] / GiB
        colour = "red" if mem > cap else ("yellow" if mem > 0.9 * cap else "green")
        first = r["replica"] != last
        t.add_row(str(r["replica"]) if first else "", str(r["stage"]), r["host"],
                  format_mesh(r["dp"], r["tp"]), format_layers(*r["layers"]),
                  f"{r['rows']} = {r['rows'] // r['microbatch']}x{r['microbatch']}" if first else "",
                  _ms(r["compute_s"]), _ms(r["comm_s"]), _ms(r["bubble_s"]),
                  *(f"{r[k] / GiB:.2f}" for k in ("param_bytes", "grad_bytes", "optimizer_bytes")),
                  f"{r['stash_bytes'] / GiB:.2f} ({r['stash_microbatches']})", f"{r['workspace_bytes'] / GiB:.2f}",
                  f"[{colour}]{mem:.1f}[/]/{cap:.1f}")
        last = r["replica"]
    return t


def _s(x: float) -> str:
    return f"{x:,.3f} s" if x >= 1 else f"{x * 1e3:,.3f} ms"


def totals_text(plan, pred, wl, search: bool) -> str:
    lines = [
        f"replicas {len(plan.replicas)}, sequences per step {list(plan.replica_rows or [])} of {wl.global_batch} "
        f"x {wl.seq_len} tokens, {pred.microbatches} microbatches per replica, remat {wl.remat}, {wl.dtype}",
        "comp/comm ms: one microbatch on the stage; bubble ms: its idle time per step; memory in GiB per device",
        f"step {_s(pred.step_s)} (slowest replica {_s(max(r.pipeline_s for r in pred.replicas))} + gradient "
        f"sync {_s(pred.sync_s)})   {pred.tokens_per_s:,.0f} tokens/s",
        f"price ${pred.price_per_hour:,.2f}/h, ${pred.dollars_per_mtok:,.4f} per million tokens",
    ]
    meta = (plan.prediction or {}).get("search") if search else None
    if meta:
        kind = "exhaustive search" if meta.get("exhaustive") else "search"
        count = meta.get("replicas", meta.get("candidates"))
        what = "replicas" if meta.get("exhaustive") else "candidate pipelines"
        lines.append(f"{kind} {meta['search_s']:.2f} s over {count} {what}, pipelines of at most "
                     f"{meta['max_stages']} stages")
        if "gap_bound_s" in meta:
            gap = meta["gap_bound_s"]
            lines.append("replicas split for their own speed or sync bounded; " + (
                "optimal over every layer split too" if gap <= 0 else
                f"a plan of the space is faster by at most {_s(gap)}"))
    return "\n".join(lines)


def summary(plan, pred, cluster, wl, search: bool) -> dict[str, Any]:
    return {"task": "train", "model": plan.model, "objective": plan.objective, "cluster": cluster.name,
            "cluster_fingerprint": cluster.fingerprint(), "workload": wl.to_dict(),
            "microbatches": pred.microbatches, "replica_rows": list(plan.replica_rows or []),
            "devices_used": len(plan.devices), "devices_total": cluster.num_devices,
            "stages": stage_rows(plan, pred, cluster), "prediction": pred.to_dict(),
            "search": (plan.prediction or {}).get("search") if search else None, "plan": plan.to_dict()}


def _verify(plan, cfg, cluster, wl, as_json: bool) -> list:
    from hexjax.cli.plan import compile_progress
    from hexjax.search.train_verify import verify_train
    with compile_progress(enabled=not as_json) as progress:
        checks = verify_train(plan, cfg, cluster, wl, progress=progress)
    if not as_json:
        from rich.table import Table

        from hexjax.cli._console import table_console
        from hexjax.models.config import format_bytes as fb
        from hexjax.plan import format_layers, format_mesh
        t = Table(title=f"memory per device: cost model vs XLA's analysis of the compiled training programs "
                        f"({wl.dtype}, remat {wl.remat})", header_style="bold")
        for name in ("rep", "st", "layers", "mesh", "state model", "state XLA", "ratio", "activations model",
                     "activations XLA", "ratio", "total model", "total XLA", "ratio"):
            t.add_column(name, justify="right")
        for c in checks:
            t.add_row(str(c.replica), str(c.stage), format_layers(*c.layers), format_mesh(c.dp, c.tp),
                      fb(c.predicted_state_bytes), fb(c.xla_state_bytes), f"{c.state_ratio:.3f}",
                      fb(c.predicted_activation_bytes), fb(c.xla_activation_bytes), f"{c.activation_ratio:.3f}",
                      fb(c.predicted_total_bytes), fb(c.xla_total_bytes), f"{c.total_ratio:.3f}")
        con = table_console()
        con.print(t)
        con.print("ratio = XLA / model. state: the update program's arguments (parameters, AdamW moments, "
                  "gradients); activations: min(S - s, M) microbatches' stash (the forward's outputs the backward "
                  "reads) + the larger of the forward's and backward's temporaries (the last stage runs its forward "
                  "inside its backward program)")
    return checks


def _finish(plan, pred, cfg, cluster, wl, title: str, written: list[str], as_json: bool, verify: bool,
            searched: bool, extra: dict | None = None) -> None:
    if not as_json:
        from hexjax.cli._console import table_console
        con = table_console()
        con.print(table(plan, pred, cluster, title))
        con.print(totals_text(plan, pred, wl, searched))
        for w in written:
            con.print(f"wrote {w}")
    checks = _verify(plan, cfg, cluster, wl, as_json) if verify else None
    if as_json:
        d = summary(plan, pred, cluster, wl, searched)
        d.update(extra or {})
        d["written"] = written
        if checks is not None:
            d["verify"] = [c.to_dict() for c in checks]
        typer.echo(json.dumps(d, indent=2))
    if not pred.fits:
        raise typer.Exit(1)


def _picture(svg: Path | None, title: str, plan, cluster) -> list[str]:
    if svg is None:
        return []
    from hexjax.search.draw import draw
    return [str(draw([(title, plan)], cluster, svg))]


def plan_train_cmd(cluster_file: Path, model: str, seq_len: int | None, global_batch: int | None,
                   microbatches: str | None, remat: str | None, dtype: str | None, objective: str,
                   budget_per_hour: float | None, exhaustive: bool, max_stages: int | None, out: Path | None,
                   as_json: bool, svg: Path | None, verify: bool) -> None:
    from hexjax.cli.plan import _DelayedProgress, _start_compile_devices, load_config, output_file
    from hexjax.cluster import Cluster
    from hexjax.search import train_cost
    from hexjax.search.train_search import plan_train

    cluster = Cluster.load(cluster_file)
    cfg = load_config(model)
    wl = train_workload(seq_len, global_batch, microbatches, remat, dtype)
    check_seq_len(cfg, wl)
    if budget_per_hour is not None and not budget_per_hour > 0:
        raise ConfigError(f"--budget-per-hour must be positive dollars per hour, got {budget_per_hour}")
    for path, option in ((out, "--out"), (svg, "--svg")):
        output_file(path, option)
    _start_compile_devices(cluster, verify)
    with _DelayedProgress(enabled=not as_json) as progress:
        result = plan_train(cfg, cluster, wl, objective, budget_per_hour=budget_per_hour, exhaustive=exhaustive,
                            max_stages=max_stages, progress=progress)
    pred = train_cost.predict(result, cfg, cluster, wl)
    written = []
    if out is not None:
        result.save(out)
        written.append(str(out))
    what = "cost" if objective == "cost" else "throughput" + (f" within ${budget_per_hour:g}/h" if budget_per_hour
                                                              else "")
    title = f"{cfg.name} training on {cluster.name}: best plan for {what}"
    written += _picture(svg, title, result, cluster)
    _finish(result, pred, cfg, cluster, wl, title, written, as_json, verify, searched=True)


def explain_train_cmd(plan, plan_file: Path, cfg, cluster, seq_len: int | None, global_batch: int | None,
                      microbatches: str | None, remat: str | None, as_json: bool, svg: Path | None,
                      verify: bool) -> None:
    """Explain a loaded training plan (``plan.training`` set) on ``cluster``."""
    from hexjax.cli.plan import _start_compile_devices, output_file
    from hexjax.plan import TrainSpec
    from hexjax.search import train_cost

    base = plan.training.workload
    wl = train_workload(seq_len, global_batch, None, remat, None, base=base)
    check_seq_len(cfg, wl)
    M = plan.training.microbatches
    if microbatches is not None:
        mbs = parse_microbatches(microbatches)
        if len(mbs) != 1:
            raise ConfigError(f"--microbatches {microbatches}: explain takes one count for the plan, e.g. 4")
        M = mbs[0]
    rows = plan.training.replica_rows
    if wl.global_batch != base.global_batch:
        rows = train_cost.even_rows(wl.global_batch, len(plan.replicas))
    for i, (rep, r) in enumerate(zip(plan.replicas, rows)):
        import math
        g = M * math.lcm(*(s.dp for s in rep.stages))
        if r % g:
            raise ConfigError(f"replica {i} takes {r} sequences per step, which do not split into {M} microbatches "
                              f"of a multiple of its dp; give --global-batch and --microbatches that do "
                              f"(shares are multiples of {g})")
    plan = dataclasses.replace(plan, training=TrainSpec(wl, M, tuple(rows)))
    output_file(svg, "--svg")
    _start_compile_devices(cluster, verify)
    problems = plan.layout_problems(cfg, cluster.num_devices)
    if problems:
        raise ConfigError(f"{plan_file} is not a valid plan for {cfg.name}: " + "; ".join(problems))
    pred = train_cost.predict(plan, cfg, cluster, wl)
    title = f"{plan_file.name}: {cfg.name} training on {cluster.name}"
    written = _picture(svg, title, plan, cluster)
    _finish(plan, pred, cfg, cluster, wl, title, written, as_json, verify, searched=False, extra={"valid": pred.fits})
