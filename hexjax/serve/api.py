"""An OpenAI-compatible HTTP API (FastAPI) over an ``Engine``.

``POST /v1/completions`` (prompt as token ids, or text with a tokenizer),
``POST /v1/chat/completions`` (needs a tokenizer with a chat template),
``GET /v1/models``, ``GET /health``, ``GET /metrics``.  Streaming is SSE
(``data: {...}`` lines, then ``data: [DONE]``), with a usage chunk at the end
when ``stream_options.include_usage`` is set.  Bad requests get OpenAI-style
error JSON with status 400.  Each choice carries the generated ``token_ids``
as well as ``text`` (empty without a tokenizer).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
import uuid
from typing import Any, Literal

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from hexjax.errors import ConfigError
from hexjax.serve.engine import Engine, SamplingParams


class APIError(Exception):
    def __init__(self, message: str, status: int = 400, param: str | None = None,
                 type: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.message, self.status, self.param, self.type, self.code = message, status, param, type, code


def _error(message: str, status: int = 400, param=None, type="invalid_request_error", code=None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type, "param": param, "code": code}},
                        status_code=status)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class _Common(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    max_tokens: int | None = None
    temperature: float = Field(1.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=-1)
    min_p: float = Field(0.0, ge=0, le=1)
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    seed: int | None = Field(None, ge=0, lt=2 ** 31)
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    min_tokens: int = 0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: Any = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None


class CompletionRequest(_Common):
    prompt: str | list[int] | list[str] | list[list[int]]
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict] | None = None


class ChatRequest(_Common):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    top_logprobs: int | None = None


def create_app(engine: Engine, *, model_name: str | None = None, tokenizer=None, metrics=None,
               manage_engine: bool = True) -> FastAPI:
    """The ASGI app.  ``metrics``: the engine's ``ServeMetrics`` for ``/metrics``; ``manage_engine``
    starts the engine's background loop with the app and stops it at shutdown."""
    name = model_name or engine.model_name
    created = int(time.time())

    @contextlib.asynccontextmanager
    async def lifespan(app):
        if manage_engine:
            engine.start()
        try:
            yield
        finally:
            if manage_engine:
                engine.stop()

    app = FastAPI(title="hexjax", lifespan=lifespan)

    @app.exception_handler(RequestValidationError)
    async def _validation(request, exc: RequestValidationError):
        errs = exc.errors()
        first = errs[0] if errs else {}
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        if first.get("type") == "json_invalid":
            return _error("request body is not valid JSON")
        if first.get("type") == "extra_forbidden":
            return _error(f"unknown field {'.'.join(loc)!r}", param=".".join(loc) or None)
        msg = "; ".join(f"{'.'.join(str(x) for x in e.get('loc', ()) if x != 'body')}: {e.get('msg')}"
                        for e in errs[:3])
        return _error(msg or "invalid request", param=".".join(loc) or None)

    @app.exception_handler(APIError)
    async def _api_error(request, exc: APIError):
        return _error(exc.message, exc.status, exc.param, exc.type, exc.code)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc: StarletteHTTPException):
        return _error(str(exc.detail), exc.status_code, type="invalid_request_error" if exc.status_code < 500
                      else "server_error")

    @app.exception_handler(Exception)
    async def _internal(request, exc: Exception):
        return _error(f"internal error: {type(exc).__name__}: {exc}", 500, type="server_error")

    # ---- helpers ----

    def check_model(req: _Common) -> None:
        if req.model is not None and req.model != name:
            raise APIError(f"the model {req.model!r} does not exist; this server serves {name!r}", 404,
                           "model", code="model_not_found")

    def sampling(req: _Common, prompt_len: int, max_tokens: int | None) -> SamplingParams:
        if req.n != 1:
            raise APIError("only n=1 is supported", param="n")
        if isinstance(req, CompletionRequest) and req.best_of not in (None, 1):
            raise APIError("only best_of=1 is supported", param="best_of")
        stop = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
        if stop and tokenizer is None:
            raise APIError("stop strings need the model's tokenizer and this model has none; use stop_token_ids",
                           param="stop")
        if any(not x for x in stop):
            raise APIError("stop strings must not be empty", param="stop")
        if isinstance(req, ChatRequest):
            if req.logprobs not in (None, True, False):
                raise APIError("logprobs must be true or false", param="logprobs")
            logprobs = (req.top_logprobs or 0) if req.logprobs else None
        else:
            if req.logprobs is not None and (isinstance(req.logprobs, bool) or not isinstance(req.logprobs, int)):
                raise APIError("logprobs must be an integer (0-20) or null", param="logprobs")
            logprobs = req.logprobs
        if req.logit_bias:
            raise APIError("logit_bias is not supported", param="logit_bias")
        if max_tokens is None:
            max_tokens = engine.max_model_len - prompt_len
        if max_tokens < 1:
            raise APIError(f"max_tokens must be at least 1, got {max_tokens}", param="max_tokens")
        try:
            return SamplingParams(max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p,
                                  top_k=max(0, req.top_k), min_p=req.min_p, seed=req.seed,
                                  stop_token_ids=tuple(req.stop_token_ids or ()), stop=stop,
                                  ignore_eos=req.ignore_eos,
                                  min_tokens=req.min_tokens, presence_penalty=req.presence_penalty,
                                  frequency_penalty=req.frequency_penalty, logprobs=logprobs)
        except ConfigError as e:
            raise APIError(str(e)) from None

    def encode(text: str) -> list[int]:
        if tokenizer is None:
            raise APIError("this model has no tokenizer: give the prompt as a list of token ids", param="prompt")
        return list(tokenizer(text, add_special_tokens=True)["input_ids"])

    def decode(ids: list[int]) -> str:
        return tokenizer.decode(ids, skip_special_tokens=True) if tokenizer is not None and ids else ""

    if tokenizer is not None and engine.detokenize is None:   # outputs carry text; stop strings work
        engine.detokenize = decode

    def new_text(out) -> str:
        """Text a stream chunk adds: held back while it may begin a stop string (see hexjax.serve.text)."""
        return out.new_text if out.new_text is not None else decode(out.new_token_ids)

    def text_of(out) -> str:
        return out.text if out.text is not None else decode(out.token_ids)

    def prompts_of(req: CompletionRequest) -> list[list[int]]:
        p = req.prompt
        if isinstance(p, str):
            return [encode(p)]
        if p and all(isinstance(x, int) for x in p):
            return [list(p)]
        if not p:
            raise APIError("prompt is empty", param="prompt")
        return [encode(x) if isinstance(x, str) else list(x) for x in p]

    def check(ids: list[int], sp: SamplingParams) -> list[int]:
        try:
            return engine.check_request(ids, sp)
        except ConfigError as e:
            raise APIError(str(e), param="prompt") from None

    def usage(prompt_tokens: int, completion_tokens: int) -> dict:
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens}

    def tokstr(t: int) -> str:
        return tokenizer.decode([t]) if tokenizer is not None else f"token_id:{t}"

    def completion_logprobs(ids: list[int], lps, offset: int = 0):
        if lps is None:
            return None
        tokens = [tokstr(t) for t in ids]
        offsets = []
        for t in tokens:
            offsets.append(offset)
            offset += len(t)
        return {"tokens": tokens, "token_logprobs": [lp for lp, _ in lps],
                "top_logprobs": [{tokstr(i): v for i, v in top} for _, top in lps], "text_offset": offsets}

    def chat_logprobs(ids: list[int], lps):
        if lps is None:
            return None

        def entry(t, lp):
            s = tokstr(t)
            return {"token": s, "logprob": lp, "bytes": list(s.encode())}
        return {"content": [entry(t, lp) | {"top_logprobs": [entry(i, v) for i, v in top]}
                            for t, (lp, top) in zip(ids, lps)]}

    def sse(obj) -> str:
        return f"data: {json.dumps(obj)}\n\n"

    async def run_one(ids: list[int], sp: SamplingParams):
        async for out in engine.stream(ids, sp):
            yield out

    # ---- endpoints ----

    @app.get("/health")
    async def health():
        if engine.error is not None:
            return _error(f"engine failed: {engine.error}", 503, type="server_error")
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": name, "object": "model", "created": created,
                                            "owned_by": "hexjax", "max_model_len": engine.max_model_len}]}

    @app.get("/metrics")
    async def metrics_endpoint():
        if metrics is None:
            return Response("", media_type="text/plain")
        metrics.update(engine)
        from prometheus_client import CONTENT_TYPE_LATEST
        return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest):
        check_model(req)
        if req.echo or req.suffix:
            raise APIError("echo and suffix are not supported", param="echo" if req.echo else "suffix")
        prompts = prompts_of(req)
        if req.stream and len(prompts) > 1:
            raise APIError("streaming takes one prompt", param="prompt")
        jobs = []
        for ids in prompts:
            sp = sampling(req, len(ids), req.max_tokens if req.max_tokens is not None else 16)
            jobs.append((check(ids, sp), sp))
        rid = f"cmpl-{uuid.uuid4().hex}"
        now = int(time.time())
        if req.stream:
            ids, sp = jobs[0]
            include = bool(req.stream_options and req.stream_options.include_usage)

            async def events():
                n = 0
                async for out in run_one(ids, sp):
                    n = len(out.token_ids)
                    if not out.new_token_ids and not out.finished:
                        continue
                    yield sse({"id": rid, "object": "text_completion", "created": now, "model": name,
                               "choices": [{"index": 0, "text": new_text(out),
                                            "token_ids": out.new_token_ids,
                                            "logprobs": completion_logprobs(out.new_token_ids, out.new_logprobs),
                                            "finish_reason": out.finish_reason if out.finished else None}]})
                if include:
                    yield sse({"id": rid, "object": "text_completion", "created": now, "model": name,
                               "choices": [], "usage": usage(len(ids), n)})
                yield "data: [DONE]\n\n"
            return StreamingResponse(events(), media_type="text/event-stream")
        async def final_of(ids, sp):
            final = None
            async for out in run_one(ids, sp):
                final = out
            return final
        finals = await asyncio.gather(*(final_of(ids, sp) for ids, sp in jobs))
        choices = [{"index": i, "text": text_of(f), "token_ids": f.token_ids,
                    "logprobs": completion_logprobs(f.token_ids, f.logprobs),
                    "finish_reason": f.finish_reason} for i, f in enumerate(finals)]
        total_p = sum(len(ids) for ids, _ in jobs)
        total_c = sum(len(f.token_ids) for f in finals)
        return {"id": rid, "object": "text_completion", "created": now, "model": name, "choices": choices,
                "usage": usage(total_p, total_c)}

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest):
        check_model(req)
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise APIError(f"the model {name!r} has no tokenizer with a chat template, so chat completions "
                           "are not available; use /v1/completions", param="messages")
        msgs = [m.model_dump(exclude_none=True) for m in req.messages]
        try:
            enc = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
        except Exception as e:   # template errors are the request's fault
            raise APIError(f"could not apply the chat template: {e}", param="messages") from None
        if hasattr(enc, "keys"):
            enc = enc["input_ids"]
        ids = [int(t) for t in (enc[0] if enc and isinstance(enc[0], list) else enc)]
        mt = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        sp = sampling(req, len(ids), mt)
        ids = check(ids, sp)
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        now = int(time.time())
        if req.stream:
            include = bool(req.stream_options and req.stream_options.include_usage)

            async def events():
                yield sse({"id": rid, "object": "chat.completion.chunk", "created": now, "model": name,
                           "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                        "finish_reason": None}]})
                n = 0
                async for out in run_one(ids, sp):
                    n = len(out.token_ids)
                    yield sse({"id": rid, "object": "chat.completion.chunk", "created": now, "model": name,
                               "choices": [{"index": 0, "delta": {"content": new_text(out)},
                                            "token_ids": out.new_token_ids,
                                            "logprobs": chat_logprobs(out.new_token_ids, out.new_logprobs),
                                            "finish_reason": out.finish_reason if out.finished else None}]})
                if include:
                    yield sse({"id": rid, "object": "chat.completion.chunk", "created": now, "model": name,
                               "choices": [], "usage": usage(len(ids), n)})
                yield "data: [DONE]\n\n"
            return StreamingResponse(events(), media_type="text/event-stream")
        final = None
        async for out in run_one(ids, sp):
            final = out
        return {"id": rid, "object": "chat.completion", "created": now, "model": name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text_of(final)},
                             "token_ids": final.token_ids,
                             "logprobs": chat_logprobs(final.token_ids, final.logprobs),
                             "finish_reason": final.finish_reason}],
                "usage": usage(len(ids), len(final.token_ids))}

    return app


class ServerThread:
    """uvicorn serving ``app`` on ``host:port`` in a background thread (tests, notebooks)."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0):
        import socket

        import uvicorn
        if port == 0:
            with socket.socket() as s:
                s.bind((host, 0))
                port = s.getsockname()[1]
        self.host, self.port = host, port
        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning",
                                                    lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, name="hexjax-http", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 60) -> "ServerThread":
        self.thread.start()
        t0 = time.time()
        while not self.server.started:
            if not self.thread.is_alive() or time.time() - t0 > timeout:
                raise RuntimeError("the HTTP server did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
