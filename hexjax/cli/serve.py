"""``hexjax serve``: an OpenAI-compatible HTTP server over a plan (``hexjax.serve``)."""

from __future__ import annotations

from pathlib import Path

import typer

from hexjax.cli._distributed import COORDINATOR, NUM_PROCESSES, PROCESS_ID


def _tokenizer_of(model: str):
    """The model directory's tokenizer, or None (presets, or no tokenizer files)."""
    path = Path(model)
    if not path.is_dir() or not any((path / f).exists() for f in ("tokenizer.json", "tokenizer.model",
                                                                   "tokenizer_config.json")):
        return None
    try:
        from transformers import AutoTokenizer
        return AutoTokenizer.from_pretrained(str(path))
    except Exception:   # no usable tokenizer: serve token ids only
        return None


def build_app(model: str, plan_file: Path, *, max_batch: int | None = None, max_model_len: int | None = None,
              num_pages: int | None = None, dtype: str | None = None, platform: str | None = None,
              served_name: str | None = None, warmup: bool = True, max_step_tokens: int | None = None):
    """(app, engine) for ``hexjax serve``; JAX must already have its devices."""
    from hexjax.cli.plan import load_config
    from hexjax.cli.run import _load_plan, load_model
    from hexjax.runtime.generation import plan_dtype
    from hexjax.serve.api import create_app
    from hexjax.serve.engine import Engine
    from hexjax.serve.metrics import ServeMetrics

    cfg = load_config(model)
    plan, _ = _load_plan(plan_file, None, cfg)
    lm, _ = load_model(model, dtype or plan_dtype(plan))
    tok = _tokenizer_of(model)
    metrics = ServeMetrics()
    engine = Engine(lm, plan, max_batch=max_batch, max_model_len=max_model_len, num_pages=num_pages,
                    dtype=dtype, platform=platform, metrics=metrics, warmup=warmup, max_step_tokens=max_step_tokens,
                    eos_token_id=getattr(tok, "eos_token_id", None))
    name = served_name or (Path(model).name if Path(model).is_dir() else model)
    return create_app(engine, model_name=name, tokenizer=tok, metrics=metrics), engine


def register(app: typer.Typer) -> None:
    @app.command("serve")
    def serve(
        model: str = typer.Option(..., "--model", help="Preset name (random weights) or Hugging Face model directory."),
        plan: Path = typer.Option(..., "--plan", help="Plan JSON (from `hexjax plan`)."),
        virtual_devices: int | None = typer.Option(
            None, "--virtual-devices", help="Simulate the plan's devices as N virtual CPU devices."),
        host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on."),
        port: int = typer.Option(8000, "--port", help="Port to listen on."),
        max_batch: int | None = typer.Option(
            None, "--max-batch", help="Rows (concurrent sequences) per replica (default: 32, rounded up to a "
            "multiple of every stage's dp)."),
        max_model_len: int | None = typer.Option(
            None, "--max-model-len", help="Longest prompt plus output (default: the model's context)."),
        num_pages: int | None = typer.Option(
            None, "--num-pages", help="KV pages per stage pool (default: every row at the full context)."),
        dtype: str | None = typer.Option(None, "--dtype", help="float32 or bfloat16 (default: the plan's)."),
        served_name: str | None = typer.Option(None, "--served-model-name", help="Model name in the API."),
        max_step_tokens: int | None = typer.Option(
            None, "--max-step-tokens", help="Tokens one replica step feeds at most: decoding rows plus prefill "
            "chunks (long prompts are cut into chunks; default: max(512, 2 x max-batch))."),
        coordinator: str | None = COORDINATOR,
        num_processes: int | None = NUM_PROCESSES,
        process_id: int | None = PROCESS_ID,
    ) -> None:
        """Serve a plan over HTTP with an OpenAI-compatible API (completions, chat, SSE streaming, /metrics)."""
        from hexjax.cli._distributed import join_run
        if join_run(coordinator, num_processes, process_id):
            # the engine's admissions happen on the process that gets the requests; the others would have to
            # replay them step by step, which the engine does not do
            from hexjax.errors import ConfigError
            raise ConfigError("hexjax serve runs in one process: serving a plan whose stages live on several "
                              "processes is not supported yet. Fix: serve from one host (hexjax generate runs "
                              "across processes)")
        if virtual_devices:
            from hexjax.runtime.devices import use_virtual_cpu_devices
            use_virtual_cpu_devices(virtual_devices)
        import uvicorn
        application, engine = build_app(model, plan, max_batch=max_batch, max_model_len=max_model_len,
                                        num_pages=num_pages, dtype=dtype,
                                        platform="cpu" if virtual_devices else None, served_name=served_name,
                                        max_step_tokens=max_step_tokens)
        typer.echo(f"serving {engine.model_name} through {plan} on http://{host}:{port} "
                   f"({len(engine.replicas)} replica(s), {engine.max_batch} rows each, "
                   f"{engine.max_step_tokens} tokens a step)")
        uvicorn.run(application, host=host, port=port, log_level="info")
