"""``hexjax demo``: plan a small random Llama for the built-in uneven cluster and run the plan.

The built-in cluster is HexGen's eight GPUs (4x A6000, 2x A5000, 2x A4000),
with memory shrunk to the model so that the search must cut it into uneven
stages.  Without those GPUs, plan device ``i`` becomes virtual CPU device
``i``; the tokens are checked against single-device generation.
"""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    @app.command()
    def demo(
        model: str = typer.Option("small", "--model", help="Model preset with random weights (e.g. tiny, small, llama-125m)."),
        objective: str = typer.Option("throughput", "--objective", help="latency, throughput or cost."),
        batch: int = typer.Option(8, "--batch", min=1, help="Requests in flight per replica."),
        prompt_len: int = typer.Option(24, "--prompt-len", min=1, help="Longest prompt (prompts are ragged below it)."),
        max_new_tokens: int = typer.Option(16, "--max-new-tokens", min=1, help="Tokens to generate per prompt."),
        seed: int = typer.Option(0, "--seed", help="Seed of the weights and the prompts."),
        as_json: bool = typer.Option(False, "--json", metavar="", help="Print one JSON object."),
    ) -> None:
        """Plan a small random Llama on the built-in 8-GPU cluster, run it, and check it against one device."""
        import json

        from rich.console import Console

        from hexjax.cli.plan import check_context, check_model_arg
        from hexjax.models.config import ModelConfig
        from hexjax.runtime.devices import use_virtual_cpu_devices
        from hexjax.runtime.simulate import HEXGEN_8GPU

        check_model_arg(model)
        cfg = ModelConfig.preset(model)
        check_context(cfg, prompt_len, max_new_tokens)
        num = sum(h["count"] for h in HEXGEN_8GPU["host"])
        use_virtual_cpu_devices(num)   # before JAX starts; GPUs, where present, are used instead
        import jax

        from hexjax.cli.run import show_simulated_run, simulated_stage_rows
        from hexjax.runtime.simulate import needed_devices, plan_and_run

        run = plan_and_run(model, objective=objective, batch=batch, prompt_len=prompt_len,
                           max_new_tokens=max_new_tokens, seed=seed)
        devices = jax.devices()
        on_devices = len(devices) >= needed_devices(run.plan)
        where = (f"{len(devices)} {devices[0].platform} device(s)" if on_devices
                 else f"{len(jax.devices('cpu'))} virtual CPU devices")
        if as_json:
            typer.echo(json.dumps({
                "model": cfg.name, "num_layers": cfg.num_layers, "num_params": cfg.num_params,
                "random_weights": True, "objective": objective, "cluster": run.cluster.name, "run_on": where,
                "stages": simulated_stage_rows(run), "plan": run.plan.to_dict(),
                "prompts": run.prompts, "tokens": run.tokens, "tokens_per_s": run.tokens_per_s,
                "seconds": run.seconds, "setup_seconds": run.setup_seconds,
                "predicted_tokens_per_s": run.prediction.throughput_tokens_per_s,
                "single_device_tokens_per_s": (sum(map(len, run.tokens)) / run.reference_seconds
                                               if run.reference_seconds else None),
                "matches_single_device": run.matches}, indent=2))
        else:
            console = Console()
            console.print(f"[bold]hexjax demo[/]: {cfg.name} ({cfg.num_layers} layers, {cfg.num_params / 1e6:.1f}M "
                          f"parameters, random weights), best plan for {objective} on {run.cluster.name}, "
                          f"run on {where}")
            show_simulated_run(run, console)
        if not run.matches:
            raise typer.Exit(1)
