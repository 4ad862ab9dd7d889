"""``hexjax plan`` (search a plan) and ``hexjax explain`` (evaluate any plan)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import typer

from hexjax.errors import ConfigError


class _DelayedProgress:
    """A transient rich progress bar on stderr, called as ``progress(done, total, label)``.

    It appears only once the work has run for ``after_s`` seconds.  Each label
    gets its own bar (the search's phases), or, with ``single``, one bar shows
    the current label (the stage and phase being compiled).
    """

    def __init__(self, enabled: bool, after_s: float = 1.0, verb: str = "searching", single: bool = False):
        self.enabled, self.after_s, self.t0 = enabled, after_s, time.perf_counter()
        self.verb, self.single = verb, single
        self.bar = None
        self.tasks: dict[str, int] = {}

    def __call__(self, done: int, total: int, what: str) -> None:
        if not self.enabled:
            return
        if self.bar is None:
            if time.perf_counter() - self.t0 < self.after_s:
                return
            from rich.console import Console
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                       TimeRemainingColumn)
            self.bar = Progress(TextColumn(f"[bold]{self.verb}[/] {{task.description}}"), BarColumn(),
                                MofNCompleteColumn(), TimeElapsedColumn(), TextColumn("eta"),
                                TimeRemainingColumn(), console=Console(stderr=True), transient=True)
            self.bar.start()
        key = "" if self.single else what
        if key not in self.tasks:
            self.tasks[key] = self.bar.add_task(what, total=total)
        self.bar.update(self.tasks[key], completed=done, total=total, description=what)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None

    def __enter__(self) -> "_DelayedProgress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def compile_progress(enabled: bool = True) -> _DelayedProgress:
    """The progress callback for ``verify_plan``/``dump_hlo``: one bar naming the stage and phase."""
    return _DelayedProgress(enabled, after_s=0.0, verb="compiling", single=True)


# ---------------------------------------------------------------- checks where user input meets the model

def load_config(model: str):
    """``ModelConfig`` for ``--model`` (preset name or Hugging Face directory), with clear errors."""
    from hexjax.models.config import ModelConfig
    check_model_arg(model)
    return ModelConfig.load(model)


def check_model_arg(model: str) -> None:
    """Refuse an empty ``--model``, and a path-like one that does not exist (before anything reads it)."""
    from hexjax.models.config import PRESETS
    known = ", ".join(sorted(PRESETS))
    if not model.strip():
        raise ConfigError(f"--model is empty; give a preset name ({known}) or a Hugging Face model directory")
    if ("/" in model or model.startswith((".", "~"))) and not Path(model).expanduser().exists():
        raise ConfigError(f"--model {model}: directory {model} does not exist; give an existing Hugging Face "
                          f"model directory (with config.json), or a preset name ({known})")


def _longer_presets(tokens: int) -> str:
    from hexjax.models.config import PRESETS
    names = [n for n, c in PRESETS.items() if c.max_position_embeddings >= tokens and c.num_params > 1e9]
    return f" (presets with room for it: {', '.join(names)})" if names else ""


def check_context(cfg, prompt_len: int, output_len: int) -> None:
    """Refuse a workload whose prompt plus output is longer than the model's context."""
    total, limit = prompt_len + output_len, cfg.max_position_embeddings
    if total > limit:
        raise ConfigError(
            f"prompt {prompt_len} + output {output_len} = {total} tokens, but {cfg.name} has only {limit} "
            f"positions (max_position_embeddings); lower --prompt-len and --output-len to at most {limit} "
            f"tokens together, or use a model with a longer context{_longer_presets(total)}")


def output_file(path: Path | None, option: str) -> Path | None:
    """Make sure a file can be written at ``path``: refuse a directory, create missing parents."""
    if path is None:
        return None
    if path.is_dir():
        raise ConfigError(f"{option} {path} is a directory; give a file name, e.g. {option} {path / 'plan.json'}"
                          if option == "--out" else f"{option} {path} is a directory; give a file name")
    _mkdir(path.parent, option, path)
    return path


def output_dir(path: Path, option: str = "--out") -> Path:
    """Make sure ``path`` is a directory to write into (created with its parents if missing)."""
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{option} {path} is an existing file, not a directory; give a directory for the "
                          f"dumps (it is created if missing), e.g. {option} hlo/")
    _mkdir(path, option, path)
    return path


def _mkdir(folder: Path, option: str, given: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise ConfigError(f"{option} {given}: cannot create directory {folder}, part of its path is a file") from None
    except OSError as e:
        raise ConfigError(f"{option} {given}: cannot create directory {folder} ({e.strerror})") from None


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


def _show(plan, pred, cluster, title: str, written: list[str], search: bool) -> None:
    from hexjax.cli._console import table_console
    from hexjax.search.report import table, totals_text
    con = table_console()
    con.print(table(plan, pred, cluster, title=title))
    con.print(totals_text(plan, pred, cluster, search=search))
    for w in written:
        con.print(f"wrote {w}")


def _verify(plan, cfg, cluster, wl, as_json: bool):
    """Compile each stage ahead of time; print XLA's per-device memory against capacity.

    Returns the report; its stages that do not fit are flagged in red.
    """
    from hexjax.runtime import verify_plan
    with compile_progress(enabled=not as_json) as progress:
        report = verify_plan(plan, cfg, cluster, wl, progress=progress)
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
            extra: dict | None = None, searched: bool = False) -> None:
    """Print the plan (table or JSON), compiling it first with ``verify``; exit 1 if it does not fit.

    ``searched``: the plan comes from a search run now, whose statistics are shown.
    """
    from hexjax.search.report import summary
    if not as_json:
        _show(plan, pred, cluster, title, written, searched)
        if plan.routing is not None:
            from hexjax.search.routing import routing_text
            typer.echo(routing_text(plan.routing))
    report = _verify(plan, cfg, cluster, wl, as_json) if verify else None
    if as_json:
        d = summary(plan, pred, cluster, search=searched)
        if plan.routing is not None:
            d["routing"] = plan.routing.to_dict()
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
        from hexjax.runtime import compile_devices
        compile_devices(cluster.num_devices)


def plan_cmd(cluster_file: Path, model: str, prompt_len: int, output_len: int, batch: int, rate: float | None,
             slo_ms: float | None, objective: str, exhaustive: bool, max_stages: int | None, out: Path | None,
             as_json: bool, svg: Path | None, png: Path | None, verify: bool = False,
             trace_file: Path | None = None) -> None:
    from hexjax.cluster import Cluster
    from hexjax.search import cost
    from hexjax.search.planner import plan as search_plan

    cluster = Cluster.load(cluster_file)
    cfg = load_config(model)
    trace = None
    if trace_file is not None:   # plan for the trace's sizes: costed at its mean lengths, routed by size
        from hexjax.trace import load_trace
        if prompt_len is not None or output_len is not None:
            raise ConfigError("--trace gives the request sizes; drop --prompt-len/--output-len")
        trace = load_trace(trace_file)
        trace.check_model(cfg)
        wl = trace.workload(batch, rate, None if slo_ms is None else slo_ms / 1e3)
    else:
        if prompt_len is None or output_len is None:
            raise ConfigError("give the workload: --prompt-len N --output-len N (and --batch N), or the request "
                              "sizes as --trace requests.jsonl")
        wl = _workload(prompt_len, output_len, batch, rate, slo_ms)
    check_context(cfg, wl.prompt_len, wl.output_len)
    for path, option in ((out, "--out"), (svg, "--svg"), (png, "--png")):
        output_file(path, option)
    _start_compile_devices(cluster, verify)
    with _DelayedProgress(enabled=not as_json) as progress:
        result = search_plan(cfg, cluster, wl, objective, exhaustive=exhaustive, max_stages=max_stages,
                             progress=progress)
    if trace is not None:
        import dataclasses

        from hexjax.search.routing import choose_routing, routing_text
        choice = choose_routing(result, cfg, cluster, trace, wl.batch)
        result = dataclasses.replace(result, routing=choice.routing)
        if not as_json and choice.table is not None:
            p99 = ", ".join(f"{k} {v:.3g} s" for k, v in choice.p99_latency_s.items())
            typer.echo(f"trace {trace.name}: {len(trace)} requests, costed at mean prompt {wl.prompt_len} / output "
                       f"{wl.output_len}; size {routing_text(choice.table)}; simulated p99 latency at "
                       f"{choice.rate_per_s:.3g} req/s: {p99} -> "
                       + ("table kept" if choice.routing is not None else "routing by load kept (no table)"))
    pred = cost.predict(result, cfg, cluster, wl)
    written = []
    if out is not None:
        result.save(out)
        written.append(str(out))
    title = f"{cfg.name} on {cluster.name}: best plan for {objective}"
    written += _pictures(svg, png, title, result, cluster, pred)
    _finish(result, pred, cfg, cluster, wl, title, written, as_json, verify, searched=True)


def plan_model(plan, plan_file: Path, model: str | None):
    """The model a plan is used with: ``--model``, else the plan's own when it is a preset; checked
    against the model the plan was made for."""
    from hexjax.models.config import PRESETS, ModelConfig
    if model is None:
        if plan.model.lower() not in PRESETS:
            raise ConfigError(f"{plan_file} was made for {plan.model}, which is not a preset; "
                              f"pass --model with its Hugging Face directory")
        cfg = ModelConfig.preset(plan.model)
    else:
        cfg = load_config(model)
    plan.check_model(cfg, where=str(plan_file))
    return cfg


def explain_cmd(plan_file: Path, cluster_file: Path, model: str | None, prompt_len: int | None,
                output_len: int | None, batch: int | None, rate: float | None, slo_ms: float | None, as_json: bool,
                svg: Path | None, png: Path | None, verify: bool = False, train_options=(None,) * 4) -> None:
    from hexjax.cluster import Cluster
    from hexjax.plan import Plan
    from hexjax.search import cost

    cluster = Cluster.load(cluster_file)
    plan = Plan.load(plan_file)
    cfg = plan_model(plan, plan_file, model)
    if plan.training is not None:
        from hexjax.cli.plan_train import explain_train_cmd
        return explain_train_cmd(plan, plan_file, cfg, cluster, *train_options, as_json, svg, verify)
    wl = _workload(prompt_len, output_len, batch, rate, slo_ms, base=plan.workload)
    check_context(cfg, wl.prompt_len, wl.output_len)
    for path, option in ((svg, "--svg"), (png, "--png")):
        output_file(path, option)
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
                plan.prediction, plan.routing)
    pred = cost.predict(plan, cfg, cluster, wl)
    title = f"{plan_file.name}: {cfg.name} on {cluster.name}"
    written = _pictures(svg, png, title, plan, cluster, pred)
    _finish(plan, pred, cfg, cluster, wl, title, written, as_json, verify, extra={"valid": True})


VERIFY_HELP = ("Compile each stage ahead of time (no weights) and check XLA's per-device memory against the "
               "devices' capacity.")


def register(app: typer.Typer) -> None:
    @app.command("plan")
    def plan(
        cluster: Path | None = typer.Option(None, "--cluster", help="Cluster TOML file (or --rent OFFERS)."),
        rent: Path | None = typer.Option(None, "--rent", help="Offers TOML file: choose the cheapest devices to rent "
                                                             "for --rate within --slo-ms (see `hexjax rent`)."),
        model: str = typer.Option(..., "--model", help="Preset name or Hugging Face model directory."),
        prompt_len: int | None = typer.Option(None, "--prompt-len", help="Prompt tokens per request."),
        output_len: int | None = typer.Option(None, "--output-len", help="Generated tokens per request."),
        trace: Path | None = typer.Option(None, "--trace", help="Plan for these request sizes instead (.jsonl "
                                                                "or .json histogram): routed by size."),
        batch: int = typer.Option(1, "--batch", help="Requests in flight per replica."),
        rate: float | None = typer.Option(None, "--rate", help="Requests/s the plan must sustain (cost objective)."),
        slo_ms: float | None = typer.Option(None, "--slo-ms", help="Bound on end-to-end latency, milliseconds."),
        objective: str | None = typer.Option(None, "--objective", help="latency (default), throughput or cost; "
                                                                          "training: throughput (default) or cost."),
        exhaustive: bool = typer.Option(False, "--exhaustive", metavar="",
                                        help="Enumerate every plan (about ten devices at most)."),
        task: str = typer.Option("serve", "--task", help="serve, or train (a training plan: --seq-len, "
                                                            "--global-batch)."),
        seq_len: int | None = typer.Option(None, "--seq-len", help="Training: tokens per sequence."),
        global_batch: int | None = typer.Option(None, "--global-batch", help="Training: sequences per step."),
        microbatches: str | None = typer.Option(None, "--microbatches", help="Training: microbatch counts to try "
                                                                             "(default 1,2,4,8,16,32)."),
        remat: str | None = typer.Option(None, "--remat", help="Training: none (default) or full."),
        dtype: str | None = typer.Option(None, "--dtype", help="Training: bfloat16 (mixed precision, default) or "
                                                               "float32."),
        budget: float | None = typer.Option(None, "--budget-per-hour", help="Training: most dollars per hour "
                                                                            "the plan may cost."),
        max_stages: int | None = typer.Option(None, "--max-stages", help="Longest pipeline (default: automatic)."),
        out: Path | None = typer.Option(None, "--out", help="Write the plan JSON here."),
        as_json: bool = typer.Option(False, "--json", metavar="", help="Print one JSON object."),
        svg: Path | None = typer.Option(None, "--svg", help="Draw the plan to this SVG file."),
        png: Path | None = typer.Option(None, "--png", help="Draw the plan to this PNG file."),
        verify: bool = typer.Option(False, "--verify/--no-verify", metavar="", help=VERIFY_HELP),
    ) -> None:
        """Search the best plan for a model, a cluster and a workload."""
        if task not in ("serve", "train"):
            raise ConfigError(f"--task {task!r}: use serve or train")
        if task == "train":
            from hexjax.cli.plan_train import plan_train_cmd
            if cluster is None:
                raise ConfigError("--cluster is missing; give a cluster TOML file (examples/clusters/)")
            return plan_train_cmd(cluster, model, seq_len, global_batch, microbatches, remat, dtype,
                                  objective or "throughput", budget, exhaustive, max_stages, out, as_json, svg, verify)
        objective = objective or "latency"
        if rent is not None:
            from hexjax.cli.rent import rent_cmd
            if cluster is not None:
                raise ConfigError("give --cluster or --rent, not both (--rent chooses the devices)")
            return rent_cmd(rent, model, prompt_len, output_len, trace, batch, rate, slo_ms, max_stages, out, as_json)
        if cluster is None:
            raise ConfigError("--cluster is missing; give a cluster TOML file (examples/clusters/), or --rent OFFERS")
        plan_cmd(cluster, model, prompt_len, output_len, batch, rate, slo_ms, objective, exhaustive, max_stages,
                 out, as_json, svg, png, verify, trace_file=trace)

    @app.command("explain")
    def explain(
        plan_file: Path = typer.Argument(..., help="Plan JSON (from `hexjax plan` or written by hand)."),
        cluster: Path = typer.Option(..., "--cluster", help="Cluster TOML file."),
        model: str | None = typer.Option(
            None, "--model", help="Preset name or Hugging Face model directory (default: the plan's, if a preset)."),
        prompt_len: int | None = typer.Option(None, "--prompt-len", help="Prompt tokens (default: the plan's)."),
        output_len: int | None = typer.Option(None, "--output-len", help="Generated tokens (default: the plan's)."),
        batch: int | None = typer.Option(None, "--batch", help="Requests in flight per replica (default: the plan's)."),
        rate: float | None = typer.Option(None, "--rate", help="Requests/s to check against."),
        slo_ms: float | None = typer.Option(None, "--slo-ms", help="Latency bound to check, milliseconds."),
        as_json: bool = typer.Option(False, "--json", metavar="", help="Print one JSON object."),
        svg: Path | None = typer.Option(None, "--svg", help="Draw the plan to this SVG file."),
        png: Path | None = typer.Option(None, "--png", help="Draw the plan to this PNG file."),
        verify: bool = typer.Option(False, "--verify/--no-verify", metavar="", help=VERIFY_HELP),
        seq_len: int | None = typer.Option(None, "--seq-len", help="Training plan: tokens per sequence."),
        global_batch: int | None = typer.Option(None, "--global-batch", help="Training plan: sequences per step."),
        microbatches: str | None = typer.Option(None, "--microbatches", help="Training plan: microbatches."),
        remat: str | None = typer.Option(None, "--remat", help="Training plan: none or full."),
    ) -> None:
        """Predict time and memory of any plan, and list every rule an invalid one breaks."""
        explain_cmd(plan_file, cluster, model, prompt_len, output_len, batch, rate, slo_ms, as_json, svg, png,
                    verify, train_options=(seq_len, global_batch, microbatches, remat))
