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
              served_name: str | None = None, warmup: bool = True, max_step_tokens: int | None = None,
              multi: bool = False):
    """(app, engine) for ``hexjax serve``; JAX must already have its devices.  ``multi``: this process is
    one of a run over several (every process builds the same engine; ``hexjax.serve.multiprocess``)."""
    from hexjax.cli.plan import load_config
    from hexjax.cli.run import _load_plan, load_model
    from hexjax.runtime.generation import plan_dtype
    from hexjax.serve.api import create_app
    from hexjax.serve.engine import Engine
    from hexjax.serve.metrics import ServeMetrics

    cfg = load_config(model)
    plan, _ = _load_plan(plan_file, None, cfg)
    across = {}
    if multi:
        from hexjax.cli._distributed import check_run
        from hexjax.runtime import distributed
        from hexjax.serve.multiprocess import engine_options
        check_run(plan, None, "serve")
        # every process must build the same engine: the same programs, pools and step shapes
        distributed.check_same("serve", {"the model": repr(cfg), "--max-batch": max_batch,
                                         "--max-model-len": max_model_len, "--num-pages": num_pages,
                                         "--dtype": dtype, "--max-step-tokens": max_step_tokens,
                                         "the platform": platform})
        across = engine_options(distributed.process_index())
    lm, _ = load_model(model, dtype or plan_dtype(plan))
    if multi:   # every process places its own shards from the same host values
        across["params"] = distributed.host_params(lm.params)
    tok = _tokenizer_of(model)
    metrics = ServeMetrics()
    engine = Engine(lm, plan, max_batch=max_batch, max_model_len=max_model_len, num_pages=num_pages,
                    dtype=dtype, platform=platform, metrics=metrics, warmup=warmup, max_step_tokens=max_step_tokens,
                    eos_token_id=getattr(tok, "eos_token_id", None), **across)
    name = served_name or (Path(model).name if Path(model).is_dir() else model)
    # across processes the caller starts and stops the engine: its last step must end before the followers
    # are told to stop
    return create_app(engine, model_name=name, tokenizer=tok, metrics=metrics, manage_engine=not multi), engine


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
        warmup: bool = typer.Option(True, "--warmup/--no-warmup",
                                    help="Compile the common step shapes before serving (else at first use)."),
        coordinator: str | None = COORDINATOR,
        num_processes: int | None = NUM_PROCESSES,
        process_id: int | None = PROCESS_ID,
    ) -> None:
        """Serve a plan over HTTP with an OpenAI-compatible API (completions, chat, SSE streaming, /metrics).

        Across processes (--coordinator ..., or hexjax launch), process 0 serves HTTP and schedules; the
        others run its steps on their stages."""
        from hexjax.cli._distributed import join_run
        multi = join_run(coordinator, num_processes, process_id)
        if virtual_devices:
            from hexjax.runtime.devices import use_virtual_cpu_devices
            use_virtual_cpu_devices(virtual_devices)
        import uvicorn
        application, engine = build_app(model, plan, max_batch=max_batch, max_model_len=max_model_len,
                                        num_pages=num_pages, dtype=dtype,
                                        platform="cpu" if virtual_devices else None, served_name=served_name,
                                        max_step_tokens=max_step_tokens, warmup=warmup, multi=multi)
        if multi:
            _serve_across(application, engine, plan, host, port)
            return
        typer.echo(f"serving {engine.model_name} through {plan} on http://{host}:{port} "
                   f"({len(engine.replicas)} replica(s), {engine.max_batch} rows each, "
                   f"{engine.max_step_tokens} tokens a step)")
        uvicorn.run(application, host=host, port=port, log_level="info")


def _fail(message: str) -> None:
    """End this process of a multi-process run with one line (the others notice it is gone)."""
    import os
    import sys
    print(f"error: {message}", file=sys.stderr, flush=True)
    os._exit(1)


def _serve_across(application, engine, plan: Path, host: str, port: int) -> None:
    """One process of a serving run over several: process 0 serves HTTP and schedules, the others follow."""
    import signal
    import threading

    import uvicorn

    from hexjax.runtime import distributed
    from hexjax.serve.multiprocess import follow, stop_followers
    me, n = distributed.process_index(), distributed.num_processes()
    distributed.barrier("serve")   # every engine is built (weights placed, programs compiled)
    stop_watch = distributed.watch_peers(what="serving run")
    if me != 0:
        # an interrupt (Ctrl-C reaches every process of a local launch) waits for process 0's stop record
        late = threading.Timer(10.0, _fail, (f"process {me} was interrupted and process 0 did not stop the run "
                                             "within 10 s. Fix: stop the run at process 0",))
        late.daemon = True
        signal.signal(signal.SIGINT, lambda *_: late.start() if not late.is_alive() else None)
        try:
            steps = follow(engine)
        except distributed.PeerLost as e:
            _fail(f"process {me}: {e}. Fix: see process 0's output, then restart every process of the run")
        except Exception as e:
            _fail(f"process {me} could not run process 0's step ({type(e).__name__}: "
                  f"{str(e).splitlines()[0] if str(e) else ''}). Fix: check this process's devices and output")
        late.cancel()
        stop_watch()
        typer.echo(f"process {me}: ran {steps} step(s) of process 0; stopped with it", err=True)
        return
    # an engine failure on process 0 ends the run: the followers cannot go on without its steps
    engine.on_error = lambda e: _fail(f"the engine failed on process 0 ({type(e).__name__}: {e}); "
                                       f"stopping all {n} processes. Fix: see the message above")
    typer.echo(f"serving {engine.model_name} through {plan} on http://{host}:{port} "
               f"({len(engine.replicas)} replica(s), {engine.max_batch} rows each, {engine.max_step_tokens} "
               f"tokens a step; stages on {n} processes, this is process 0)")
    engine.start()
    try:
        uvicorn.run(application, host=host, port=port, log_level="info")
    finally:
        engine.stop(timeout=None)   # no step runs after this: the stop record is the last the followers take
        stop_watch()
        stop_followers()
        distributed.finish()
