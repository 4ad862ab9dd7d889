"""``hexjax plan`` (search a plan) and ``hexjax explain`` (evaluate any plan)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import typer

from hexjax.errors import ConfigError


class _DelayedProgress:
    """A rich progress bar on stderr that appears only once a search has run for a second."""

    def __init__(self, enabled: bool, after_s: float = 1.0):
        self.enabled, self.after_s, self.t0 = enabled, after_s, time.perf_counter()
        self.bar = None
        self.tasks: dict[str, int] = {}

    def __call__(self, done: int, total: int, what: str) -> None:
        if not self.enabled:
            return
        if self.bar is None:
            if time.perf_counter() - self.t0 < self.after_s:
                return
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
            self.bar = Progress(TextColumn("[bold]searching[/] {task.description}"), BarColumn(),
                                MofNCompleteColumn(), TimeElapsedColumn(), console=Console(stderr=True),
                                transient=True)
            self.bar.start()
        if what not in self.tasks:
            self.tasks[what] = self.bar.add_task(what, total=total)
        self.bar.update(self.tasks[what], completed=done, total=total)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def _workload(prompt_len, output_len, batch, rate, slo_ms, base=None):
    from hexjax.workload import Workload
    if base is None and (prompt_len is None or output_len is None):
        raise ConfigError("give the workload: --prompt-len N --output-len N (and --batch N); "
                          "the plan file carries none")
    return Workload(
        prompt_len=prompt_len if prompt_len is not None else base.prompt_len,
        output_len=output_len if output_len is not None else base.output_len,
        batch=batch if batch is not None else (base.batch if base else 1),
        rate_per_s=rate if rate is not None else (base.rate_per_s if base else None),
        slo_s=slo_ms / 1e3 if slo_ms is not None else (base.slo_s if base else None))


def _pictures(svg: Path | None, png: Path | None, title: str, plan, cluster, pred) -> list[str]:
    from hexjax.search.draw import draw
    return [str(draw([(title, plan)], cluster, p, [pred])) for p in (svg, png) if p is not None]


def _show(plan, pred, cluster, title: str, written: list[str]) -> None:
    from rich.console import Console

    from hexjax.search.report import table, totals_text
    con = Console()
    if not con.is_terminal:   # piped: do not squeeze the table into 80 columns
        con = Console(width=130)
    con.print(table(plan, pred, cluster, title=title))
    con.print(totals_text(plan, pred, cluster))
    for w in written:
        con.print(f"wrote {w}")


def _verify(plan, cfg, cluster, wl, as_json: bool):
    """Compile each stage ahead of time; print XLA's per-device memory against capacity.

    Returns the report; its stages that do not fit are flagged in red.
    """
    from hexjax.runtime.hlo import verify_plan
    report = verify_plan(plan, cfg, cluster, wl)
    if not as_json:
        from rich.console import Console
        con = Console(width=130)
        con.print("[bold]compiled memory per device[/] (XLA, ahead of time, no weights):")
        typer.echo(report.table())
        con.print("[green]every stage fits its devices[/]" if report.ok
                  else "[bold red]some stage does NOT fit its devices when compiled[/]")
    return report


def _verify_json(report) -> dict:
    return {"ok": report.ok, "stages": [
        {"replica": s.replica, "stage": s.stage, "devices": list(s.devices), "device": s.device_type,
         "compiled_bytes": s.compiled_bytes, "usable_bytes": s.usable_bytes, "capacity_bytes": s.capacity_bytes,
         "fits": s.fits} for s in report.stages]}


def _finish(plan, pred, cfg, cluster, wl, title: str, written: list[str], as_json: bool, verify: bool,
            extra: dict | None = None) -> None:
    """Print the plan (table or JSON), compiling it first with ``verify``; exit 1 if it does not fit."""
    from hexjax.search.report import summary
    if not as_json:
        _show(plan, pred, cluster, title, written)
    report = _verify(plan, cfg, cluster, wl, as_json) if verify else None
    if as_json:
        d = summary(plan, pred, cluster)
        d.update(extra or {})
        d["written"] = written
        if report is not None:
            d["verify"] = _verify_json(report)
        typer.echo(json.dumps(d, indent=2))
    if report is not None and not report.ok:
        raise typer.Exit(1)


def _start_compile_devices(cluster, verify: bool) -> None:
    # the number of virtual CPU devices is fixed when JAX starts: ask for the cluster's before searching
    if verify:
        from hexjax.runtime.hlo import compile_devices
        compile_devices(cluster.num_devices)


def plan_cmd(cluster_file: Path, model: str, prompt_len: int, output_len: int, batch: int, rate: float | None,
             slo_ms: float | None, objective: str, exhaustive: bool, max_stages: int | None, out: Path | None,
             as_json: bool, svg: Path | None, png: Path | None, verify: bool = False) -> None:
    from hexjax.cluster import Cluster
    from hexjax.models.config import ModelConfig
    from hexjax.search import cost
    from hexjax.search.planner import plan as search_plan

    cluster = Cluster.load(cluster_file)
    cfg = ModelConfig.load(model)
    wl = _workload(prompt_len, output_len, batch, rate, slo_ms)
    _start_compile_devices(cluster, verify)
    progress = _DelayedProgress(enabled=not as_json)
    try:
        result = search_plan(cfg, cluster, wl, objective, exhaustive=exhaustive, max_stages=max_stages,
                             progress=progress)
    finally:
        progress.close()
    pred = cost.predict(result, cfg, cluster, wl)
    written = []
    if out is not None:
        result.save(out)
        written.append(str(out))
    title = f"{cfg.name} on {cluster.name}: best plan for {objective}"
    written += _pictures(svg, png, title, result, cluster, pred)
    _finish(result, pred, cfg, cluster, wl, title, written, as_json, verify)


def explain_cmd(plan_file: Path, cluster_file: Path, model: str, prompt_len: int | None, output_len: int | None,
                batch: int | None, rate: float | None, slo_ms: float | None, as_json: bool,
                svg: Path | None, png: Path | None, verify: bool = False) -> None:
    from hexjax.cluster import Cluster
    from hexjax.models.config import ModelConfig
    from hexjax.plan import Plan
    from hexjax.search import cost

    cluster = Cluster.load(cluster_file)
    cfg = ModelConfig.load(model)
    plan = Plan.load(plan_file)
    wl = _workload(prompt_len, output_len, batch, rate, slo_ms, base=plan.workload)
    _start_compile_devices(cluster, verify)
    problems = plan.violations(cfg, cluster, wl)
    if problems:
        if as_json:
            typer.echo(json.dumps({"valid": False, "plan": str(plan_file), "violations": problems}, indent=2))
        else:
            from rich.console import Console
            from rich.markup import escape
            con = Console(stderr=True)
            con.print(f"[bold red]{plan_file} is not a valid plan[/] for {cfg.name} on {cluster.name} "
                      f"({len(problems)} problem{'s' if len(problems) > 1 else ''}):")
            for p in problems:
                con.print(f"  - {escape(p)}", highlight=False)
        raise typer.Exit(1)
    plan = Plan(plan.model, plan.cluster_fingerprint, plan.replicas, wl, plan.objective, plan.dtype_bytes,
                plan.prediction)
    pred = cost.predict(plan, cfg, cluster, wl)
    title = f"{plan_file.name}: {cfg.name} on {cluster.name}"
    written = _pictures(svg, png, title, plan, cluster, pred)
    _finish(plan, pred, cfg, cluster, wl, title, written, as_json, verify, extra={"valid": True})


def register(app: typer.Typer) -> None:
    @app.command("plan")
    def plan(
        cluster: Path = typer.Option(..., "--cluster", help="Cluster TOML file."),
        model: str = typer.Option(..., "--model", help="Preset name or Hugging Face model directory."),
        prompt_len: int = typer.Option(..., "--prompt-len", help="Prompt tokens per request."),
        output_len: int = typer.Option(..., "--output-len", help="Generated tokens per request."),
        batch: int = typer.Option(1, "--batch", help="Requests in flight per replica."),
        rate: float | None = typer.Option(None, "--rate", help="Requests/s the plan must sustain (cost objective)."),
        slo_ms: float | None = typer.Option(None, "--slo-ms", help="Bound on end-to-end latency, milliseconds."),
        objective: str = typer.Option("latency", "--objective", help="latency, throughput or cost."),
        exhaustive: bool = typer.Option(False, "--exhaustive", help="Enumerate every plan (about ten devices at most)."),
        max_stages: int | None = typer.Option(None, "--max-stages", help="Longest pipeline (default: automatic)."),
        out: Path | None = typer.Option(None, "--out", help="Write the plan JSON here."),
        as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
        svg: Path | None = typer.Option(None, "--svg", help="Draw the plan to this SVG file."),
        png: Path | None = typer.Option(None, "--png", help="Draw the plan to this PNG file."),
        verify: bool = typer.Option(False, "--verify", help="Compile each stage ahead of time (no weights) and "
                                    "check XLA's per-device memory against the devices' capacity."),
    ) -> None:
        """Search the best plan for a model, a cluster and a workload."""
        plan_cmd(cluster, model, prompt_len, output_len, batch, rate, slo_ms, objective, exhaustive, max_stages,
                 out, as_json, svg, png, verify)

    @app.command("explain")
    def explain(
        plan_file: Path = typer.Argument(..., help="Plan JSON (from `hexjax plan` or written by hand)."),
        cluster: Path = typer.Option(..., "--cluster", help="Cluster TOML file."),
        model: str = typer.Option(..., "--model", help="Preset name or Hugging Face model directory."),
        prompt_len: int | None = typer.Option(None, "--prompt-len", help="Prompt tokens (default: the plan's)."),
        output_len: int | None = typer.Option(None, "--output-len", help="Generated tokens (default: the plan's)."),
        batch: int | None = typer.Option(None, "--batch", help="Requests in flight per replica (default: the plan's)."),
        rate: float | None = typer.Option(None, "--rate", help="Requests/s to check against."),
        slo_ms: float | None = typer.Option(None, "--slo-ms", help="Latency bound to check, milliseconds."),
        as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
        svg: Path | None = typer.Option(None, "--svg", help="Draw the plan to this SVG file."),
        png: Path | None = typer.Option(None, "--png", help="Draw the plan to this PNG file."),
        verify: bool = typer.Option(False, "--verify", help="Compile each stage ahead of time (no weights) and "
                                    "check XLA's per-device memory against the devices' capacity."),
    ) -> None:
        """Predict time and memory of any plan, and list every rule an invalid one breaks."""
        explain_cmd(plan_file, cluster, model, prompt_len, output_len, batch, rate, slo_ms, as_json, svg, png,
                    verify)
