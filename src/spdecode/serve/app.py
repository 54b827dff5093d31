"""The FastAPI app: OpenAI's /v1/models, /v1/completions and /v1/chat/completions (streamed as
server-sent events when asked), /health and Prometheus' /metrics, over one Engine."""

from __future__ import annotations

import asyncio
import json
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from ..runtime.errors import SpdError
from ..runtime.prompts import template_ids
from .engine import Engine, EngineDown, Job, Outcome, QueueFull
from .metrics import ServerMetrics
from .openai_api import ApiError, ChatRequest, CompletionRequest, chat_messages, parse, sampling_of, stops_of

POLL_S = 0.2  # how often a waiting request checks that its client is still there
MAX_BODY_BYTES = 4 << 20  # a request body past this is refused (413) before it is read whole


def chat_prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    """The chat template over `messages`; a template that refuses them (e.g. a role-alternation
    check raising) is the client's error, an OpenAI-shaped 400, not a server error."""
    try:
        return template_ids(tokenizer, messages, add_generation_prompt=True)
    except Exception as exc:  # jinja2's TemplateError, or whatever the template raises
        raise ApiError(400, f"the model's chat template refused these messages: {exc}", "messages") from None


def create_app(engine: Engine, tokenizer, model_id: str, context_length: int, metrics: ServerMetrics,
               description: str = "", fingerprint: str = "spdecode") -> FastAPI:
    """`fingerprint`: every response's system_fingerprint, the configuration serving it."""
    # The method writes drafts past the answer: a request may use the context less those.
    in_flight = engine.decoder.in_flight
    app = FastAPI(title="spdecode", description=description)
    created = int(time.time())

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError):
        metrics.http.labels(request.url.path, str(exc.status)).inc()
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):  # unknown routes, wrong methods
        return JSONResponse(ApiError(exc.status_code, str(exc.detail)).body(), status_code=exc.status_code)

    @app.get("/health")
    async def health():
        problem = engine.down or (engine.decoder.problem() if engine.decoder.problem else None)
        if problem:  # the engine stopped, or the decoder cannot serve until it is restarted
            raise ApiError(503, problem, code="unavailable")
        return {"status": "ok", "running": int(engine.running is not None), "waiting": engine.waiting()}

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.exposition(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_id, "object": "model", "created": created,
                                            "owned_by": "spdecode",
                                            # what a request (prompt and answer) may use, as vLLM reports it
                                            "max_model_len": context_length - in_flight}]}

    async def body_of(request: Request):
        too_big = ApiError(413, f"the request body exceeds {MAX_BODY_BYTES} bytes", code="request_too_large")
        try:
            if int(request.headers.get("content-length") or 0) > MAX_BODY_BYTES:
                raise too_big
        except ValueError:
            raise ApiError(400, "the content-length header is not a number") from None
        raw = bytearray()
        async for chunk in request.stream():  # chunked bodies carry no length: count as they come
            raw += chunk
            if len(raw) > MAX_BODY_BYTES:
                raise too_big
        try:
            return json.loads(bytes(raw))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ApiError(400, "the request body is not valid JSON") from None

    def check_model(name: str) -> None:
        if name != model_id:
            raise ApiError(400, f"the model {name!r} is not served here (this server serves {model_id!r})", "model",
                           "model_not_found")

    def make_job(ids: list[int], req, max_tokens: int | None) -> Job:
        if not ids:
            raise ApiError(400, "the prompt is empty", "prompt")
        usable = context_length - in_flight
        room = usable - len(ids)
        limit = (f"the model's context is {context_length} tokens" if not in_flight else
                 f"a request may use {usable} of the model's {context_length} tokens of context (this method "
                 f"keeps {in_flight} positions of drafts in flight)")
        if room < 1:
            raise ApiError(400, f"the prompt has {len(ids)} tokens and leaves no room for an answer: {limit}",
                           "messages" if isinstance(req, ChatRequest) else "prompt", "context_length_exceeded")
        if max_tokens is None:
            max_tokens = room
        elif max_tokens > room:
            raise ApiError(400, f"max_tokens {max_tokens} and the prompt's {len(ids)} tokens do not fit: {limit}",
                           "max_tokens", "context_length_exceeded")
        try:
            sampling = sampling_of(req)
        except SpdError as exc:
            raise ApiError(400, str(exc)) from None
        return Job(ids, max_tokens, sampling, stops_of(req), asyncio.get_running_loop())

    def submit(job: Job) -> None:
        try:
            engine.submit(job)
        except QueueFull as exc:
            raise ApiError(429, str(exc), code="queue_full", type_="rate_limit_error") from None
        except EngineDown as exc:
            raise ApiError(503, str(exc), code="unavailable", type_="server_error") from None

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        req = parse(ChatRequest, await body_of(request))
        check_model(req.model)
        if not tokenizer.chat_template:
            raise ApiError(400, f"{model_id} has no chat template: use /v1/completions", "messages")
        # Templating and tokenizing take CPU time: off the event loop, which serves every client.
        ids = await run_in_threadpool(chat_prompt_ids, tokenizer, chat_messages(req))
        job = make_job(ids, req, req.max_completion_tokens or req.max_tokens)
        return await respond(request, job, req, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        req = parse(CompletionRequest, await body_of(request))
        check_model(req.model)
        prompt = req.prompt
        if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
            if len(prompt) != 1:
                raise ApiError(400, "one prompt per request (n = 1, no batches)", "prompt")
            prompt = prompt[0]
        if isinstance(prompt, str):
            if not prompt.strip():
                raise ApiError(400, "the prompt is empty", "prompt")
            ids = list((await run_in_threadpool(tokenizer, prompt)).input_ids)
        else:
            ids = list(prompt)
            if any(not 0 <= t < len(tokenizer) for t in ids):
                raise ApiError(400, "a prompt token id is outside the vocabulary", "prompt")
        job = make_job(ids, req, req.max_tokens if req.max_tokens is not None else 16)  # OpenAI's default
        return await respond(request, job, req, chat=False)

    async def respond(request: Request, job: Job, req, chat: bool):
        submit(job)
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        endpoint = request.url.path
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            events = stream_events(request, job, rid, chat, include_usage, endpoint)
            return StreamingResponse(events, media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        text, outcome, watch = [], None, ClientWatch(request, job)
        try:
            while outcome is None:
                event = await watch.next()
                if event[0] == "text":
                    text.append(event[1])
                elif event[0] == "done":
                    outcome = event[1]
                else:
                    raise ApiError(event[1], event[2], code="generation_failed")
        finally:
            job.halt.set("cancelled")  # no-op once done; stops the engine if we leave early
        if outcome.finish_reason == "shutdown":
            raise ApiError(503, "the server shut down during this request", code="unavailable")
        metrics.http.labels(endpoint, "200").inc()
        choice = ({"index": 0, "message": {"role": "assistant", "content": "".join(text)}} if chat
                  else {"index": 0, "text": "".join(text), "logprobs": None})
        choice["finish_reason"] = outcome.finish_reason
        return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
                "model": model_id, "system_fingerprint": fingerprint, "choices": [choice], "usage": usage(job, outcome)}

    async def stream_events(request: Request, job: Job, rid: str, chat: bool, include_usage: bool, endpoint: str):
        created_at = int(time.time())
        kind = "chat.completion.chunk" if chat else "text_completion"

        def chunk(delta: str | None, finish: str | None = None, role: bool = False) -> str:
            if chat:
                d = {"role": "assistant", "content": ""} if role else ({} if delta is None else {"content": delta})
                choice = {"index": 0, "delta": d, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": delta or "", "logprobs": None, "finish_reason": finish}
            body = {"id": rid, "object": kind, "created": created_at, "model": model_id,
                    "system_fingerprint": fingerprint, "choices": [choice]}
            return f"data: {json.dumps(body)}\n\n"

        status, watch = "200", ClientWatch(request, job)
        try:
            if chat:
                yield chunk(None, role=True)
            while True:
                try:
                    event = await watch.next()
                except ApiError as exc:  # the client is gone: nobody to tell
                    status = str(exc.status)
                    return
                if event[0] == "text":
                    yield chunk(event[1])
                elif event[0] == "done":
                    outcome: Outcome = event[1]
                    if outcome.finish_reason == "shutdown":
                        status = "503"
                        err = ApiError(503, "the server shut down during this request", code="unavailable")
                        yield f"data: {json.dumps(err.body())}\n\n"
                        break
                    yield chunk(None, outcome.finish_reason)
                    if include_usage:
                        body = {"id": rid, "object": kind, "created": created_at, "model": model_id,
                                "system_fingerprint": fingerprint, "choices": [],
                                "usage": usage(job, outcome)}
                        yield f"data: {json.dumps(body)}\n\n"
                    break
                else:
                    status = str(event[1])
                    yield f"data: {json.dumps(ApiError(event[1], event[2], code='generation_failed').body())}\n\n"
                    break
            yield "data: [DONE]\n\n"
        finally:
            job.halt.set("cancelled")  # the client left mid-stream (or we are done: then a no-op)
            metrics.http.labels(endpoint, status).inc()

    return app


class ClientWatch:
    """A request's events, checking every POLL_S that its client is still there (also while tokens
    flow: writing to a closed connection is not reliably an error) and cancelling the job if not."""

    def __init__(self, request: Request, job: Job):
        self.request, self.job, self.checked = request, job, time.monotonic()

    async def next(self):
        while True:
            if time.monotonic() - self.checked > POLL_S:
                self.checked = time.monotonic()
                if await self.request.is_disconnected():
                    self.job.halt.set("cancelled")
                    raise ApiError(499, "the client went away")
            try:
                return await asyncio.wait_for(self.job.events.get(), POLL_S)
            except TimeoutError:
                continue


def usage(job: Job, outcome: Outcome) -> dict:
    return {"prompt_tokens": len(job.prompt_ids), "completion_tokens": outcome.completion_tokens,
            "total_tokens": len(job.prompt_ids) + outcome.completion_tokens}
