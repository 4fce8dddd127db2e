"""The HTTP server: OpenAI-compatible routes (FastAPI) over one `ServingEngine`.

Routes: POST /v1/chat/completions (text, and speech with `modalities: ["text", "audio"]`; streamed as
server-sent events with `stream: true`), GET /v1/models, GET /health, GET /metrics (Prometheus text).
Every route but /health needs `Authorization: Bearer <api key>` when the server has a key. Every error is
OpenAI's `{"error": {...}}` with a 4xx for anything the client can fix (500 only for a genuine fault, and
never with a traceback). Request bodies are never logged.

The engine runs on its own thread; a request's events reach its handler through an asyncio queue. A client
that goes away cancels its request, which frees its slot at the engine's next step.
"""

from __future__ import annotations

import asyncio
import collections
import hmac
import json
import logging
import time
from typing import Any, AsyncIterator

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from omni_jax.errors import UsageError
from omni_jax.runtime.scheduler import EngineStopped, Event, QueueFull, ServeRequest, ServingEngine
from omni_jax.runtime.types import Request as RuntimeRequest
from omni_jax.serving import protocol
from omni_jax.serving.protocol import ApiError

log = logging.getLogger(__name__)


class _Transcripts:
    """audio id -> transcript of recent spoken replies (so a client can pass a spoken turn back by id)."""

    def __init__(self, size: int = 1024):
        self._d: collections.OrderedDict[str, str] = collections.OrderedDict()
        self._size = size

    def __contains__(self, key) -> bool:
        return key in self._d

    def __getitem__(self, key: str) -> str:
        return self._d[key]

    def add(self, key: str, text: str) -> None:
        self._d[key] = text
        while len(self._d) > self._size:
            self._d.popitem(last=False)


def create_app(engine: ServingEngine, *, model_name: str = "qwen3-omni", api_key: str | None = None,
               max_request_bytes: int = 32 << 20, max_audio_seconds: float = 300.0,
               default_max_tokens: int = 512, poll_s: float = 0.25, media_dir: str | None = None) -> FastAPI:
    """The FastAPI app over a started `engine`. default_max_tokens: a request's budget when it sets none
    (capped by what its prompt leaves of max_len). media_dir: image_url / video_url parts may name local files
    under it (None: data: URLs only)."""
    app = FastAPI(title="omni_jax", docs_url=None, redoc_url=None, openapi_url=None)
    pipe = engine.pipe
    voices = pipe.speakers() if pipe.has_speech else []
    transcripts = _Transcripts()
    app.state.engine = engine

    def _error(status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> JSONResponse:
        return JSONResponse(protocol.error_body(message, type_, param, code), status_code=status)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        return _error(e.status_code, str(e.detail), "invalid_request_error" if e.status_code < 500 else "server_error")

    @app.exception_handler(Exception)
    async def _internal(request: Request, e: Exception):
        log.error("internal error on %s: %s", request.url.path, type(e).__name__)
        return _error(500, "internal server error", "server_error")

    @app.middleware("http")
    async def _auth(request: Request, call_next):
        if api_key and request.url.path != "/health":
            header = request.headers.get("authorization", "")
            given = header[7:] if header.lower().startswith("bearer ") else ""
            if not hmac.compare_digest(given.encode(), api_key.encode()):
                what = "missing" if not given else "incorrect"
                return _error(401, f"{what} API key: send 'Authorization: Bearer <key>'", code="invalid_api_key")
        return await call_next(request)

    @app.get("/health")
    async def health():
        if engine.stopping:
            return _error(503, "shutting down", "server_error", code="shutting_down")
        return {"status": "ok", "model": model_name, "random_weights": pipe.random_weights}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0, "owned_by": "omni_jax"}]}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(prometheus_text(engine.snapshot()), media_type="text/plain; version=0.0.4")

    async def _read_body(request: Request) -> Any:
        size = request.headers.get("content-length")
        too_big = ApiError(413, f"request body is larger than {max_request_bytes} bytes (--max_request_mb)",
                           code="request_too_large")
        if size is not None and size.isdigit() and int(size) > max_request_bytes:
            raise too_big
        chunks, total = [], 0
        async for part in request.stream():
            total += len(part)
            if total > max_request_bytes:
                raise too_big
            chunks.append(part)
        try:
            return json.loads(b"".join(chunks))
        except (ValueError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from None

    def _prepare(params: protocol.ChatParams) -> ServeRequest:
        """Template, audio features, images / videos and budget (a worker thread: numpy, the tokenizer, Pillow and
        PyAV, no jax)."""
        try:
            ids, feats, visual = pipe.prepare(RuntimeRequest(messages=params.messages, speaker=params.voice,
                                                             use_audio_in_video=params.use_audio_in_video))
            room = engine.max_len - len(ids)
            max_tokens = params.max_tokens if params.max_tokens is not None else max(1, min(default_max_tokens, room))
            req = ServeRequest(prompt_ids=ids, max_new_tokens=max_tokens, audio=list(feats), visual=list(visual),
                               speech=params.speech,
                               speaker=params.voice, temperature=params.temperature, top_k=params.top_k,
                               top_p=params.top_p, seed=params.seed)
            engine.check(req)
        except UsageError as e:
            code = "context_length_exceeded" if "max_len" in str(e) else None
            raise ApiError(400, str(e), code=code) from None
        return req

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await _read_body(request)
        params = protocol.parse_chat(body, voices=voices, max_audio_seconds=max_audio_seconds, transcripts=transcripts,
                                     media_dir=media_dir)
        if params.model is not None and params.model != model_name:
            raise ApiError(404, f"model {params.model!r} does not exist; this server has {model_name!r}",
                           param="model", code="model_not_found")
        if params.speech and not pipe.has_speech:
            raise ApiError(400, "this checkpoint has no talker: it answers in text only; ask for modalities [\"text\"]",
                           param="modalities")
        req = await run_in_threadpool(_prepare, params)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Event] = asyncio.Queue()
        try:
            handle = engine.submit(req, sink=lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev))
        except QueueFull as e:
            raise ApiError(429, str(e), type="rate_limit_error", code="queue_full") from None
        except EngineStopped as e:
            raise ApiError(503, str(e), type="server_error", code="shutting_down") from None
        except UsageError as e:
            raise ApiError(400, str(e)) from None
        cid, created = protocol.completion_id(), int(time.time())
        if params.stream:
            return StreamingResponse(_sse(handle, events, params, req, cid, created), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await _whole(request, handle, events, params, req, cid, created)

    async def _next(events: asyncio.Queue, request: Request | None, handle) -> Event | None:
        """The next event; None if the client went away meanwhile (the request is then cancelled)."""
        while True:
            try:
                return await asyncio.wait_for(events.get(), poll_s)
            except asyncio.TimeoutError:
                if request is not None and await request.is_disconnected():
                    handle.cancel()
                    return None

    async def _whole(request, handle, events, params, req, cid, created):
        try:
            while True:
                ev = await _next(events, request, handle)
                if ev is None:
                    return PlainTextResponse("", status_code=499)
                if ev.kind == "error":
                    raise _engine_error(ev.error)
                if ev.kind == "done":
                    break
        finally:
            if not handle.finished:
                handle.cancel()
        res = ev.result
        audio = None
        if params.speech:
            aid = protocol.audio_id()
            wav = res.wav if res.wav is not None else np.zeros((0,), np.float32)
            data = protocol.wav_bytes(wav, res.sample_rate) if params.audio_format == "wav" else protocol.pcm16(wav)
            audio = protocol.audio_payload(aid, data, res.text)
            transcripts.add(aid, res.text)
        return protocol.completion(cid, model_name, created, res.text, res.finish_reason, len(req.prompt_ids),
                                   len(res.token_ids), audio)

    async def _sse(handle, events, params, req, cid, created) -> AsyncIterator[str]:
        def line(obj: dict) -> str:
            return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

        aid = protocol.audio_id() if params.speech else None
        try:
            yield line(protocol.chunk(cid, model_name, created, {"role": "assistant", "content": ""}))
            while True:
                ev = await _next(events, None, handle)  # a disconnect cancels this generator (finally below)
                if ev.kind == "text" and ev.text:
                    yield line(protocol.chunk(cid, model_name, created, {"content": ev.text}))
                elif ev.kind == "audio" and len(ev.audio):
                    delta = {"audio": {"id": aid, "data": protocol.audio_payload(aid, protocol.pcm16(ev.audio), "")["data"]}}
                    yield line(protocol.chunk(cid, model_name, created, delta))
                elif ev.kind == "error":
                    err = _engine_error(ev.error)
                    yield line(err.body())
                    break
                elif ev.kind == "done":
                    res = ev.result
                    if aid is not None:
                        transcripts.add(aid, res.text)
                        final = protocol.audio_payload(aid, b"", res.text)
                        del final["data"]
                        yield line(protocol.chunk(cid, model_name, created, {"audio": final}))
                    yield line(protocol.chunk(cid, model_name, created, {}, res.finish_reason))
                    if params.include_usage:
                        yield line(protocol.chunk(cid, model_name, created, {}, None,
                                                  protocol.usage(len(req.prompt_ids), len(res.token_ids))))
                    break
            yield "data: [DONE]\n\n"
        finally:
            if not handle.finished:
                handle.cancel()

    return app


def _engine_error(e: Exception) -> ApiError:
    if isinstance(e, EngineStopped):
        return ApiError(503, str(e), type="server_error", code="shutting_down")
    if isinstance(e, UsageError):
        return ApiError(400, str(e))
    log.error("request failed: %s: %s", type(e).__name__, e)
    return ApiError(500, f"the request failed in the model ({type(e).__name__}); see the server log",
                    type="server_error")


_HELP = {
    "slots": ("gauge", "decode slots (concurrent requests)"),
    "active_slots": ("gauge", "slots holding a request"),
    "peak_active_slots": ("gauge", "most slots held at once since the start"),
    "queue_length": ("gauge", "requests waiting for a slot"),
    "steps": ("counter", "scheduler iterations"),
    "tokens_per_second": ("gauge", "text tokens generated per second over the last 10 s"),
    "requests_total": ("counter", "requests accepted"),
    "requests_completed": ("counter", "requests finished"),
    "requests_cancelled": ("counter", "requests cancelled (client went away)"),
    "requests_failed": ("counter", "requests that ended with an error"),
    "generated_tokens_total": ("counter", "text tokens generated"),
    "audio_seconds_total": ("counter", "seconds of speech generated"),
}


def prometheus_text(snapshot: dict[str, float], prefix: str = "omni_jax_") -> str:
    """The engine's snapshot in the Prometheus text exposition format (latency percentiles as quantiles)."""
    lines = []
    for key, (kind, text) in _HELP.items():
        lines += [f"# HELP {prefix}{key} {text}", f"# TYPE {prefix}{key} {kind}",
                  f"{prefix}{key} {_num(snapshot.get(key, 0.0))}"]
    for name in ("time_to_first_token", "time_to_first_audio"):
        lines += [f"# HELP {prefix}{name}_seconds {name.replace('_', ' ')} of recent requests",
                  f"# TYPE {prefix}{name}_seconds summary"]
        for q in (50, 95, 99):
            lines.append(f'{prefix}{name}_seconds{{quantile="{q / 100}"}} {_num(snapshot[f"{name}_p{q}"])}')
    return "\n".join(lines) + "\n"


def _num(v: float) -> str:
    v = float(v)
    return "NaN" if v != v else repr(v)
