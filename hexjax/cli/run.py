"""``hexjax generate`` and ``hexjax dump-hlo``: run a plan, or look at what XLA compiles for it.

JAX is imported inside the commands, after ``--virtual-devices`` has been
applied: the number of virtual CPU devices is fixed when JAX starts.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer

from hexjax.cli._distributed import COORDINATOR, NUM_PROCESSES, PROCESS_ID
from hexjax.errors import ConfigError
from hexjax.plan import format_layers, format_mesh


def load_model(name_or_dir: str, dtype: str, seed: int = 0):
    """A loaded checkpoint for a directory, or random weights for a preset name: (model, is_random)."""
    from hexjax.cli.plan import check_model_arg
    check_model_arg(name_or_dir)
    path = Path(name_or_dir)
    if path.is_dir():
        from hexjax.models.hf import load_hf
        return load_hf(path, dtype=dtype), False
    if path.exists():
        raise ConfigError(f"{path}: expected a Hugging Face model directory or a preset name")
    from hexjax.models.config import ModelConfig
    from hexjax.models.hf import LlamaModel
    return LlamaModel.random(ModelConfig.preset(name_or_dir), seed=seed, dtype=dtype), True


def parse_ids(text: str) -> list[int]:
    try:
        ids = [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise ConfigError(f"--prompt-ids {text!r}: expected comma-separated integers like 1,2,3") from None
    if not ids:
        raise ConfigError("--prompt-ids: no token ids given")
    return ids


def _tokenizer(model_dir: str):
    path = Path(model_dir)
    if not path.is_dir():
        raise ConfigError(f"--prompt needs a tokenizer, but {model_dir!r} is a preset with no tokenizer; "
                          "pass --prompt-ids, or --model with a Hugging Face directory that has one")
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise ConfigError("--prompt needs the transformers package for the tokenizer; "
                          "pip install transformers, or pass --prompt-ids") from None
    try:
        return AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: no usable tokenizer ({e}); pass --prompt-ids instead") from None


def _load_plan(plan_file: Path, cluster_file: Path | None, cfg, plan=None):
    """The plan (loaded unless given), checked against ``cfg``, and the cluster if one is given."""
    from hexjax.plan import Plan
    plan = plan or Plan.load(plan_file)
    plan.check_model(cfg, where=str(plan_file))
    cluster = None
    if cluster_file is not None:
        from hexjax.cluster import Cluster
        cluster = Cluster.load(cluster_file)
        plan.validate(cfg, cluster)
    return plan, cluster


def _plan_device_count(plan) -> int:
    return max(i for r in plan.replicas for s in r.stages for i in s.devices) + 1


def generate_cmd(model: str, plan_file: Path, cluster_file: Path | None, virtual_devices: int | None,
                 prompt_ids: list[str], prompt: list[str], max_new_tokens: int, temperature: float,
                 top_k: int, top_p: float, seed: int, dtype: str | None, check: bool, as_json: bool,
                 eos_id: int | None = None, coordinator: str | None = None, num_processes: int | None = None,
                 process_id: int | None = None) -> dict:
    from hexjax.cli._distributed import across_processes, check_run, join_run
    from hexjax.runtime import distributed
    # a process of a multi-host run joins it first; --virtual-devices then checks the global count
    multi = join_run(coordinator, num_processes, process_id)
    if virtual_devices:
        from hexjax.runtime.devices import use_virtual_cpu_devices
        use_virtual_cpu_devices(virtual_devices)
    if bool(prompt_ids) == bool(prompt):
        raise ConfigError("give the prompts either as --prompt-ids 1,2,3 or as --prompt TEXT (repeat for a batch)")
    from hexjax.models.sampling import Sampling
    from hexjax.runtime.generation import RunOptions, prepare_run, run_plan

    from hexjax.cli.plan import load_config
    # the plan and the prompts are checked against the model's config before any weights are read
    cfg = load_config(model)
    plan, cluster = _load_plan(plan_file, cluster_file, cfg)
    check_run(plan, cluster, "generate")
    tok = _tokenizer(model) if prompt else None
    prompts = [parse_ids(p) for p in prompt_ids] if prompt_ids else \
        [tok(p, add_special_tokens=True)["input_ids"] for p in prompt]
    options = RunOptions(dtype=dtype, platform="cpu" if virtual_devices else None)
    # the run is laid out and its memory checked before any weights are read
    prepared = prepare_run(cfg, plan, prompts, max_new_tokens, cluster=cluster, options=options)
    lm, random_weights = load_model(model, prepared.dtype)
    sampling = Sampling(temperature, top_k, top_p, seed)
    if eos_id is None and tok is not None:
        eos_id = tok.eos_token_id
    across = dict(across_processes(multi), params=distributed.host_params(lm.params)) if multi else {}
    res = run_plan(lm, plan, prompts, max_new_tokens, sampling, cluster=cluster, options=options, eos_id=eos_id,
                   **across)
    out = {
        "model": lm.cfg.name, "random_weights": random_weights, "plan": str(plan_file),
        "prompts": prompts, "tokens": res.tokens,
        "tokens_per_s": res.tokens_per_s, "seconds": res.seconds, "setup_seconds": res.compile_seconds,
    }
    if tok is not None:
        out["text"] = [tok.decode(t) for t in res.tokens]
    if check:
        if not sampling.greedy:
            raise ConfigError("--check compares greedy tokens with single-device generation; drop --temperature")
        want = lm.generate(prompts, max_new_tokens, sampling, eos_id=eos_id)
        out["matches_single_device"] = want == res.tokens
    if as_json:
        typer.echo(json.dumps(out))
    else:
        from rich.console import Console
        con = Console()
        note = " (random weights)" if random_weights else ""
        con.print(f"[bold]{lm.cfg.name}[/]{note} through {plan_file}: {len(plan.replicas)} replica(s)",
                  highlight=False)
        for ri, r in enumerate(plan.replicas):
            con.print(f"  replica {ri}: layers " + " -> ".join(
                f"{format_layers(*s.layers)} on {format_mesh(s.dp, s.tp)}" for s in r.stages), highlight=False)
        for i, t in enumerate(res.tokens):
            line = f"[{i}] {prompts[i]} -> {t}"
            if tok is not None:
                line += f"\n    {out['text'][i]!r}"
            con.print(line, highlight=False)
        con.print(f"{sum(map(len, res.tokens))} tokens in {res.seconds:.2f} s: {res.tokens_per_s:.1f} tokens/s "
                  f"(setup and compile {res.compile_seconds:.2f} s)")
        if check:
            con.print("tokens equal single-device generation: "
                      + ("[green]yes[/]" if out["matches_single_device"] else "[red]NO[/]"))
    if check and not out["matches_single_device"]:
        raise typer.Exit(1)
    return out


def dump_hlo_cmd(model: str | None, plan_file: Path, cluster_file: Path | None, out_dir: Path,
                 virtual_devices: int | None, batch: int | None, prompt_len: int | None,
                 output_len: int | None, dtype: str | None, as_json: bool = False, task: str = "serve",
                 seq_len: int | None = None, global_batch: int | None = None, microbatches: int | None = None) -> dict:
    from hexjax.cli.plan import check_context, compile_progress, output_dir, plan_model
    from hexjax.plan import Plan
    if task not in ("serve", "train"):
        from hexjax.errors import ConfigError
        raise ConfigError(f"--task must be serve or train, got {task!r}")
    if task == "train":
        from hexjax.cli.train import dump_train_cmd
        return dump_train_cmd(model, plan_file, cluster_file, out_dir, virtual_devices, seq_len, global_batch,
                              microbatches, dtype, as_json)
    if virtual_devices:
        from hexjax.runtime.devices import use_virtual_cpu_devices
        use_virtual_cpu_devices(virtual_devices)
    plan = Plan.load(plan_file)
    cfg = plan_model(plan, plan_file, model)
    plan, cluster = _load_plan(plan_file, cluster_file, cfg, plan)
    from hexjax.workload import Workload
    base = getattr(plan, "workload", None)
    wl = Workload(prompt_len=prompt_len or (base.prompt_len if base else 128),
                  output_len=output_len or (base.output_len if base else 128),
                  batch=batch or (base.batch if base else 1))
    check_context(cfg, wl.prompt_len, wl.output_len)
    output_dir(out_dir)
    if not virtual_devices:
        # a plan for a cluster one does not have compiles on virtual CPU devices
        from hexjax.runtime import compile_devices
        compile_devices(_plan_device_count(plan))
    from hexjax.runtime import dump_hlo, plan_dtype
    dtype = dtype or plan_dtype(plan)
    with compile_progress(enabled=not as_json) as progress:
        compiles = dump_hlo(plan, cfg, wl, out_dir, cluster=cluster, dtype=dtype, progress=progress)
    files = {c.name: sorted(p.name for p in out_dir.glob(f"{c.name}.*")) for c in compiles}
    summary_md = out_dir / "summary.md"
    out = {
        "model": cfg.name, "plan": str(plan_file), "out_dir": str(out_dir), "dtype": dtype,
        "workload": wl.to_dict(), "summary": str(summary_md),
        "compiles": [dict(_compile_fields(c), files=files[c.name]) for c in compiles],
        "files": sorted(p.name for p in out_dir.iterdir()),
    }
    if as_json:
        typer.echo(json.dumps(out, indent=2))
        return out
    _show_compiles(compiles, cfg, wl, dtype, out_dir, files)
    return out


_TEXT_FIELDS = ("stablehlo", "hlo", "cost", "memory")


def _compile_fields(c) -> dict:
    """A ``StageCompile``'s figures for JSON (without the program texts and raw analyses)."""
    import dataclasses
    d = {f.name: getattr(c, f.name) for f in dataclasses.fields(c) if f.name not in _TEXT_FIELDS}
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def _si(x: float) -> str:
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if x >= scale:
            return f"{x / scale:.3g}{unit}"
    return f"{x:.3g}"


def _show_compiles(compiles, cfg, wl, dtype: str, out_dir: Path, files: dict[str, list[str]]) -> None:
    from rich.table import Table

    from hexjax.models.config import format_bytes
    from hexjax.cli._console import table_console
    con = table_console()
    t = Table(title=f"{cfg.name}: XLA's compiled programs, per device (batch {wl.batch}, prompt {wl.prompt_len}, "
                    f"output {wl.output_len}, {dtype})", header_style="bold")
    for col, justify in (("stage", "left"), ("phase", "left"), ("layers", "left"), ("mesh", "center"),
                         ("XLA FLOPs", "right"), ("XLA args", "right"), ("XLA peak", "right"),
                         ("compile s", "right")):
        t.add_column(col, justify=justify)
    for c in compiles:
        t.add_row(f"r{c.replica}.s{c.stage}", c.phase, format_layers(*c.layers), format_mesh(c.dp, c.tp),
                  _si(c.flops), format_bytes(c.argument_bytes), format_bytes(c.peak_bytes),
                  f"{c.compile_s:.1f}")
    con.print(t)
    total = sum(map(len, files.values())) + 1
    con.print(f"wrote {total} files to {out_dir}:", highlight=False, soft_wrap=True)
    con.print("  summary.md  XLA's FLOPs and memory beside the cost model's predictions, with ratios",
              highlight=False, soft_wrap=True)
    for name, got in files.items():
        suffixes = ",".join(f.removeprefix(name + ".") for f in got)
        con.print(f"  {name}.{{{suffixes}}}", highlight=False, soft_wrap=True)


def register(app: typer.Typer) -> None:
    @app.command("generate")
    def generate(
        model: str = typer.Option(..., "--model", help="Preset name (random weights) or Hugging Face model directory."),
        plan: Path = typer.Option(..., "--plan", help="Plan JSON (from `hexjax plan`)."),
        cluster: Path | None = typer.Option(None, "--cluster", help="Cluster TOML to validate the plan against."),
        virtual_devices: int | None = typer.Option(
            None, "--virtual-devices", help="Simulate the plan's devices as N virtual CPU devices."),
        prompt_ids: list[str] = typer.Option([], "--prompt-ids", help="Comma-separated token ids; repeat for a batch."),
        prompt: list[str] = typer.Option([], "--prompt", help="Prompt text (needs a tokenizer in the model dir); repeatable."),
        max_new_tokens: int = typer.Option(16, "--max-new-tokens", help="Tokens to generate per prompt."),
        temperature: float = typer.Option(0.0, "--temperature", help="0 = greedy."),
        top_k: int = typer.Option(0, "--top-k", help="Keep the k most likely tokens (0 = off)."),
        top_p: float = typer.Option(1.0, "--top-p", help="Nucleus sampling mass (1 = off)."),
        seed: int = typer.Option(0, "--seed", help="Sampling seed."),
        eos_id: int | None = typer.Option(
            None, "--eos-id", help="End a sequence after this token (default: the tokenizer's end token with --prompt)."),
        dtype: str | None = typer.Option(None, "--dtype", help="float32 or bfloat16 (default: the plan's)."),
        check: bool = typer.Option(False, "--check", metavar="",
                                   help="Also run single-device generation and compare tokens."),
        as_json: bool = typer.Option(False, "--json", metavar="", help="Print one JSON object."),
        coordinator: str | None = COORDINATOR,
        num_processes: int | None = NUM_PROCESSES,
        process_id: int | None = PROCESS_ID,
    ) -> None:
        """Generate tokens through a plan's replicas and pipeline stages."""
        generate_cmd(model, plan, cluster, virtual_devices, prompt_ids, prompt, max_new_tokens, temperature,
                     top_k, top_p, seed, dtype, check, as_json, eos_id, coordinator, num_processes, process_id)

    @app.command("dump-hlo")
    def dump_hlo(
        model: str | None = typer.Option(
            None, "--model", help="Preset name or Hugging Face model directory, config only (default: the plan's, "
                                  "if a preset)."),
        plan: Path = typer.Option(..., "--plan", help="Plan JSON."),
        out: Path = typer.Option(..., "--out", help="Directory for the dumps and summary.md."),
        cluster: Path | None = typer.Option(None, "--cluster", help="Cluster TOML (for the cost model's predictions)."),
        virtual_devices: int | None = typer.Option(None, "--virtual-devices", help="Compile on N virtual CPU devices."),
        batch: int | None = typer.Option(None, "--batch", help="Sequences per replica (default: the plan's workload)."),
        prompt_len: int | None = typer.Option(None, "--prompt-len", help="Prompt tokens (default: the plan's workload)."),
        output_len: int | None = typer.Option(None, "--output-len", help="New tokens (default: the plan's workload)."),
        dtype: str | None = typer.Option(None, "--dtype", help="Parameter and cache dtype (default: the plan's)."),
        as_json: bool = typer.Option(False, "--json", metavar="", help="Print one JSON object."),
        task: str = typer.Option("serve", "--task", help="serve (prefill/decode) or train (fwd/bwd/update)."),
        seq_len: int | None = typer.Option(None, "--seq-len", help="With --task train: tokens per sequence."),
        global_batch: int | None = typer.Option(
            None, "--global-batch", help="With --task train: sequences per step over all replicas."),
        microbatches: int | None = typer.Option(
            None, "--microbatches", help="With --task train: microbatches per replica (default: the plan's, else 1)."),
    ) -> None:
        """Compile every stage of a plan (no weights) and dump StableHLO, HLO and XLA's analyses."""
        dump_hlo_cmd(model, plan, cluster, out, virtual_devices, batch, prompt_len, output_len, dtype, as_json,
                     task, seq_len, global_batch, microbatches)


def simulated_stage_rows(run) -> list[dict]:
    """One dict per stage of a ``SimulatedRun``'s plan, with the cost model's memory per device."""
    rows = []
    for ri, (rep, rp) in enumerate(zip(run.plan.replicas, run.prediction.replicas)):
        for si, (st, sp) in enumerate(zip(rep.stages, rp.stages)):
            rows.append({"replica": ri, "stage": si, "layers": list(st.layers), "dp": st.dp, "tp": st.tp,
                         "devices": list(st.devices), "device": run.cluster.device(st.devices[0]).name,
                         "memory_bytes": sp.memory_bytes})
    return rows


def show_simulated_run(run, console=None, title: str = "", max_rows: int = 4) -> None:
    """Print a ``hexjax.runtime.simulate.SimulatedRun``: the plan per stage, tokens, tokens/s, check."""
    from rich.console import Console
    from rich.table import Table

    from hexjax.models.config import format_bytes

    console = console or Console()
    table = Table(title=title or f"plan on {run.cluster.name}")
    for col in ("stage", "layers", "mesh", "devices", "device type", "predicted memory / device"):
        table.add_column(col, justify="right" if col.startswith("predicted") else "left")
    for row in simulated_stage_rows(run):
        table.add_row(f"r{row['replica']}.s{row['stage']}", format_layers(*row["layers"]),
                      format_mesh(row["dp"], row["tp"]), ",".join(map(str, row["devices"])), row["device"],
                      format_bytes(row["memory_bytes"]))
    console.print(table)
    tokens = Table(title="tokens")
    tokens.add_column("request")
    tokens.add_column("prompt tokens", justify="right")
    tokens.add_column("new tokens")
    for i, (p, t) in enumerate(zip(run.prompts[:max_rows], run.tokens)):
        tokens.add_row(str(i), str(len(p)), " ".join(map(str, t)))
    if len(run.prompts) > max_rows:
        tokens.add_row("...", "", f"{len(run.prompts) - max_rows} more requests")
    console.print(tokens)
    n = sum(map(len, run.tokens))
    pred = run.prediction
    console.print(f"{n} tokens in {run.seconds:.3f} s: {run.tokens_per_s:,.0f} tokens/s through the plan "
                  f"(placement and compile {run.setup_seconds:.1f} s); the cost model predicts "
                  f"{pred.throughput_tokens_per_s:,.0f} tokens/s on the cluster's own GPUs")
    if run.reference is not None:
        ok = "[green]yes[/]" if run.matches else "[red]NO[/]"
        console.print(f"single device: {n / run.reference_seconds:,.0f} tokens/s; tokens identical to "
                      f"single-device generation: {ok}")
