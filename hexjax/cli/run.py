"""``hexjax generate`` and ``hexjax dump-hlo``: run a plan, or look at what XLA compiles for it.

JAX is imported inside the commands, after ``--virtual-devices`` has been
applied: the number of virtual CPU devices is fixed when JAX starts.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer

from hexjax.errors import ConfigError


def load_model(name_or_dir: str, dtype: str, seed: int = 0):
    """A loaded checkpoint for a directory, or random weights for a preset name: (model, is_random)."""
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


def _load_plan(plan_file: Path, cluster_file: Path | None, cfg):
    from hexjax.plan import Plan
    plan = Plan.load(plan_file)
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
                 top_k: int, top_p: float, seed: int, dtype: str, check: bool, as_json: bool,
                 eos_id: int | None = None) -> dict:
    if virtual_devices:
        from hexjax.runtime.devices import use_virtual_cpu_devices
        use_virtual_cpu_devices(virtual_devices)
    if bool(prompt_ids) == bool(prompt):
        raise ConfigError("give the prompts either as --prompt-ids 1,2,3 or as --prompt TEXT (repeat for a batch)")
    from hexjax.models.sampling import Sampling
    from hexjax.runtime.generation import RunOptions, run_plan

    lm, random_weights = load_model(model, dtype)
    tok = _tokenizer(model) if prompt else None
    prompts = [parse_ids(p) for p in prompt_ids] if prompt_ids else \
        [tok(p, add_special_tokens=True)["input_ids"] for p in prompt]
    plan, cluster = _load_plan(plan_file, cluster_file, lm.cfg)
    sampling = Sampling(temperature, top_k, top_p, seed)
    if eos_id is None and tok is not None:
        eos_id = tok.eos_token_id
    options = RunOptions(dtype=dtype, platform="cpu" if virtual_devices else None)
    res = run_plan(lm, plan, prompts, max_new_tokens, sampling, cluster=cluster, options=options, eos_id=eos_id)
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
        con.print(f"[bold]{lm.cfg.name}[/]{note} through {plan_file}: "
                  f"{len(plan.replicas)} replica(s), stages "
                  + " | ".join("+".join(f"{s.layers[0]}-{s.layers[1] - 1}@tp{s.tp}" + (f"xdp{s.dp}" if s.dp > 1 else "")
                                        for s in r.stages) for r in plan.replicas))
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


def dump_hlo_cmd(model: str, plan_file: Path, cluster_file: Path | None, out_dir: Path,
                 virtual_devices: int | None, batch: int | None, prompt_len: int | None,
                 output_len: int | None, dtype: str | None) -> None:
    from hexjax.models.config import ModelConfig
    if virtual_devices:
        from hexjax.runtime.devices import use_virtual_cpu_devices
        use_virtual_cpu_devices(virtual_devices)
    cfg = ModelConfig.load(model)
    plan, cluster = _load_plan(plan_file, cluster_file, cfg)
    if not virtual_devices:
        # a plan for a cluster one does not have compiles on virtual CPU devices
        from hexjax.runtime.hlo import compile_devices
        compile_devices(_plan_device_count(plan))
    from hexjax.runtime.hlo import dump_hlo, plan_dtype
    from hexjax.workload import Workload
    base = getattr(plan, "workload", None)
    wl = Workload(prompt_len=prompt_len or (base.prompt_len if base else 128),
                  output_len=output_len or (base.output_len if base else 128),
                  batch=batch or (base.batch if base else 1))
    compiles = dump_hlo(plan, cfg, wl, out_dir, cluster=cluster, dtype=dtype or plan_dtype(plan))
    typer.echo((out_dir / "summary.md").read_text())
    typer.echo(f"wrote {4 * len(compiles) + 1} files to {out_dir}")


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
        dtype: str = typer.Option("float32", "--dtype", help="float32 or bfloat16."),
        check: bool = typer.Option(False, "--check", help="Also run single-device generation and compare tokens."),
        as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
    ) -> None:
        """Generate tokens through a plan's replicas and pipeline stages."""
        generate_cmd(model, plan, cluster, virtual_devices, prompt_ids, prompt, max_new_tokens, temperature,
                     top_k, top_p, seed, dtype, check, as_json, eos_id)

    @app.command("dump-hlo")
    def dump_hlo(
        model: str = typer.Option(..., "--model", help="Preset name or Hugging Face model directory (config only)."),
        plan: Path = typer.Option(..., "--plan", help="Plan JSON."),
        out: Path = typer.Option(..., "--out", help="Directory for the dumps and summary.md."),
        cluster: Path | None = typer.Option(None, "--cluster", help="Cluster TOML (for the cost model's predictions)."),
        virtual_devices: int | None = typer.Option(None, "--virtual-devices", help="Compile on N virtual CPU devices."),
        batch: int | None = typer.Option(None, "--batch", help="Sequences per replica (default: the plan's workload)."),
        prompt_len: int | None = typer.Option(None, "--prompt-len", help="Prompt tokens (default: the plan's workload)."),
        output_len: int | None = typer.Option(None, "--output-len", help="New tokens (default: the plan's workload)."),
        dtype: str | None = typer.Option(None, "--dtype", help="Parameter and cache dtype (default: the plan's)."),
    ) -> None:
        """Compile every stage of a plan (no weights) and dump StableHLO, HLO and XLA's analyses."""
        dump_hlo_cmd(model, plan, cluster, out, virtual_devices, batch, prompt_len, output_len, dtype)


def show_simulated_run(run, console=None, title: str = "", max_rows: int = 4) -> None:
    """Print a ``hexjax.runtime.simulate.SimulatedRun``: the plan per stage, tokens, tokens/s, check."""
    from rich.console import Console
    from rich.table import Table

    from hexjax.models.config import format_bytes
    from hexjax.runtime.simulate import describe_stages

    console = console or Console()
    table = Table(title=title or f"plan on {run.cluster.name}")
    for col in ("stage", "layers", "mesh", "devices", "device type", "predicted memory / device"):
        table.add_column(col, justify="right" if col.startswith("predicted") else "left")
    mem = [s.memory_bytes for r in run.prediction.replicas for s in r.stages]
    for row, m in zip(describe_stages(run.plan, run.cluster), mem):
        table.add_row(*row, format_bytes(m))
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
