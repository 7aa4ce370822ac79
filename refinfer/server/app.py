"""The HTTP app: OpenAI's endpoints over one EngineLoop.

Where it sits: the outer layer of `refinfer serve` (cli.py -> serve -> uvicorn -> this app
-> engine_loop.py -> Engine -> model.forward). A body is validated against schemas.py,
tokenised (chat: the model's template), given to the engine as a Job, and the Job's events
become one JSON answer or server-sent events in OpenAI's chunk format:

    data: {"object": "chat.completion.chunk", "choices": [{"delta": {...}}], ...}
    ...
    data: [DONE]

A client that disconnects cancels its request (its K/V blocks are freed at once). At most
max_seqs + max_queue requests are in the server at a time; one more is answered 503.
Errors are OpenAI's JSON, {"error": {"message", "type", "param", "code"}}: 400 for a
malformed body, a wrong type or range, a prompt over the context; 401 without the API key;
404 for an unknown model or path; 413 for an oversized body; 500 only for a bug.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import aclosing, asynccontextmanager, contextmanager
from typing import Annotated

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import BaseModel
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException

from refinfer.decoding.batching import SAMPLING_FIELDS, Completion, Engine
from refinfer.decoding.batching import Request as EngineRequest
from refinfer.decoding.generate import prompt_ids
from refinfer.errors import RefinferError
from refinfer.model import Model
from refinfer.sampling import SamplingParams
from refinfer.server import schemas as api
from refinfer.server.engine_loop import Done, EngineLoop, Job, Logprob, Piece

log = logging.getLogger("refinfer.server")

DISCONNECT_POLL_SECONDS = 0.5  # how often a non-streaming request checks for its client
FINISH_REASONS = {"eos": "stop", "stop": "stop", "length": "length"}  # engine -> OpenAI
FIELD_NAMES = {f for m in (api.ChatRequest, api.CompletionRequest, api.Message,
                           api.StreamOptions) for f in m.model_fields}  # fmt: skip


class ApiError(Exception):
    """An error for the client: an HTTP status and OpenAI's error fields."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.detail = api.ErrorDetail(message=message, type=type, param=param, code=code)


class _BodyLimit:
    """ASGI middleware: 413 for a body over max_bytes, by its Content-Length or as it arrives.

    The error is raised from `receive` while the route reads the body, as an HTTPException,
    which FastAPI passes on to the app's error handler.
    """

    def __init__(self, app, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = Headers(scope=scope).get("content-length", "")
        received = 0

        async def counted_receive():
            nonlocal received
            if declared.isdigit() and int(declared) > self.max_bytes:  # refused before reading
                raise self.too_large()
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:  # sent without a Content-Length
                raise self.too_large()
            return message

        await self.app(scope, counted_receive, send)

    def too_large(self) -> HTTPException:
        return HTTPException(413, f"the body is over {self.max_bytes} bytes; send a smaller one")


class _ClientGone(Exception):
    """The client of a non-streaming request disconnected before its answer."""


class Service:
    """What the routes share: the model, its engine loop, the limits and the counters."""

    def __init__(
        self, model: Model, loop: EngineLoop, model_id: str, api_key: str | None, max_queue: int
    ) -> None:
        if model.tokenizer is None:
            raise RefinferError(f"{model.path.name} has no vocabulary; the server needs one")
        self.model = model
        self.loop = loop
        self.model_id = model_id
        self.api_key = api_key
        self.capacity = loop.engine.max_seqs + max_queue  # requests in the server at once
        self.created = int(time.time())
        self.in_flight = 0  # requests submitted and not yet answered (event loop only)
        self.rejected = 0  # requests answered 503


def create_app(
    model: Model,
    model_id: str | None = None,
    api_key: str | None = None,
    max_queue: int = 64,
    max_body_bytes: int = 1 << 20,
    threads: int = 0,
    **engine_options,
) -> FastAPI:
    """The ASGI app serving model; its engine loop runs while the app does (lifespan).

    model_id: the name clients use (default: the file's stem). api_key: the bearer key
    every request but /health must send (None: no key). max_queue: requests waiting beyond
    the running batch before 503. threads: Numba threads for the kernels (0: all).
    engine_options go to Engine (max_seqs, max_tokens_per_step, kv_blocks, ...).
    """
    loop = EngineLoop(Engine(model, **engine_options), threads)
    service = Service(model, loop, model_id or model.path.stem, api_key, max_queue)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        loop.start()
        yield
        loop.stop()

    app = FastAPI(title="refinfer", lifespan=lifespan)
    app.state.service = service
    app.add_middleware(_BodyLimit, max_bytes=max_body_bytes)
    app.include_router(public)
    app.include_router(private)
    app.add_exception_handler(ApiError, _on_api_error)
    app.add_exception_handler(RequestValidationError, _on_invalid_body)
    app.add_exception_handler(HTTPException, _on_http_error)
    app.add_exception_handler(_ClientGone, lambda request, e: Response(status_code=499))
    app.add_exception_handler(Exception, _on_bug)
    return app


def serve(
    model_path: str | None,
    host: str = "127.0.0.1",
    port: int = 8080,
    numerics: str = "exact",
    **options,
) -> None:
    """Load the model in `numerics` ('exact' or 'ggml', model.NUMERICS) and serve it with
    uvicorn until interrupted; options go to create_app."""
    import uvicorn

    from refinfer.model import load

    app = create_app(load(model_path, numerics=numerics), **options)
    service = app.state.service
    key = "; every request but /health needs the API key" if service.api_key else ""
    print(f"refinfer: serving {service.model_id} (numerics {numerics}) at "
          f"http://{host}:{port}/v1{key}", file=sys.stderr)  # fmt: skip
    uvicorn.run(app, host=host, port=port, log_level="info")


# -- requests ------------------------------------------------------------------------------


def _service(request: Request) -> Service:
    return request.app.state.service


def _authorised(request: Request) -> None:
    """401 unless the request carries the bearer key (compared in constant time)."""
    key = _service(request).api_key
    given = request.headers.get("authorization", "")
    if key is not None and not hmac.compare_digest(given.encode(), f"Bearer {key}".encode()):
        raise ApiError(
            401,
            "a valid API key is needed: send the header 'Authorization: Bearer KEY'",
            "authentication_error",
            code="invalid_api_key",
        )


ServiceDep = Annotated[Service, Depends(_service)]
public = APIRouter()
private = APIRouter(dependencies=[Depends(_authorised)])


@public.get("/health")
async def health(s: ServiceDep) -> JSONResponse:
    """200 while the engine works, 503 after it failed; with the model's numerics."""
    ok = s.loop.failure is None
    body = {"status": "ok" if ok else "failed", "numerics": s.model.numerics}
    return JSONResponse(body, status_code=200 if ok else 503)


@private.get("/v1/models", response_model=api.ModelList)
async def models(s: ServiceDep) -> api.ModelList:
    """The one model served."""
    card = api.ModelCard(id=s.model_id, created=s.created, numerics=s.model.numerics)
    return api.ModelList(data=[card])


@private.get("/metrics", response_class=PlainTextResponse)
async def metrics(s: ServiceDep) -> str:
    """The engine's statistics in Prometheus' text format."""
    return _prometheus(s)


@private.post("/v1/completions", response_model=api.CompletionResponse)
async def completions(body: api.CompletionRequest, http: Request, s: ServiceDep) -> Response:
    """Continue a prompt (text or token ids)."""
    with _client_error():
        prompt = prompt_ids(s.model, body.prompt)
    return await _answer(s, http, body, prompt, body.max_tokens, _TextReply(s, body.logprobs))


@private.post("/v1/chat/completions", response_model=api.ChatResponse)
async def chat_completions(body: api.ChatRequest, http: Request, s: ServiceDep) -> Response:
    """Answer a conversation, rendered with the model's chat template."""
    tok = s.model.tokenizer
    messages = [m.model_dump(include={"role", "content"}) for m in body.messages]
    with _client_error():
        prompt = tok.encode(tok.apply_chat_template(messages), parse_special=True)
    room = s.model.config.context_length - len(prompt)  # default: up to the end of the context
    max_tokens = body.max_completion_tokens or body.max_tokens or max(room, 1)
    n_top = body.top_logprobs if body.logprobs else None
    return await _answer(s, http, body, prompt, max_tokens, _ChatReply(s, n_top))


@contextmanager
def _client_error() -> Iterator[None]:
    """Turn a RefinferError (bad prompt, template, parameters) into a 400."""
    try:
        yield
    except RefinferError as e:
        raise ApiError(400, str(e)) from None


async def _answer(
    s: Service,
    http: Request,
    body: api.ChatRequest | api.CompletionRequest,
    prompt: list[int],
    max_tokens: int,
    reply: _Reply,
) -> Response:
    """Run one request in the engine; answer with JSON, or stream its chunks."""
    if body.model not in (None, s.model_id):
        raise ApiError(
            404,
            f"model {body.model[:80]!r} is not served here; this server serves "
            f"{s.model_id!r} (GET /v1/models)",
            param="model",
            code="model_not_found",
        )
    if s.in_flight >= s.capacity:
        s.rejected += 1
        raise ApiError(
            503, f"the server holds {s.capacity} requests already; retry later", "server_busy"
        )
    with _client_error():
        params = SamplingParams(**body.model_dump(include=set(SAMPLING_FIELDS)))
    request = EngineRequest(prompt, params, max_tokens=max_tokens, stop=body.stop_strings())
    events = _events(s, Job(request, reply.n_top), None if body.stream else http)
    first = await anext(events)
    if isinstance(first, Done) and first.completion.finish_reason == "error":
        await events.aclose()
        failed = s.loop.failure is not None
        raise ApiError(
            500 if failed else 400,
            first.completion.error,
            "server_error" if failed else "invalid_request_error",
        )
    if body.stream:
        usage = body.stream_options is not None and body.stream_options.include_usage
        return StreamingResponse(_sse(reply, first, events, usage), media_type="text/event-stream")
    async with aclosing(events):
        return reply.whole([first] + [e async for e in events])


async def _events(s: Service, job: Job, watch: Request | None) -> AsyncIterator[Piece | Done]:
    """Submit job and yield its events up to Done. If the consumer stops first (a streaming
    client went away) or the watched request's client disconnects, the job is cancelled."""
    s.in_flight += 1
    s.loop.submit(job)
    done = False
    try:
        while not done:
            event = await (_next_or_gone(job, watch) if watch else job.events.get())
            done = isinstance(event, Done)
            yield event
    finally:
        s.in_flight -= 1
        if not done:
            s.loop.cancel(job)


async def _next_or_gone(job: Job, watch: Request) -> Piece | Done:
    """job's next event; _ClientGone if watch's client disconnects first."""
    get = asyncio.ensure_future(job.events.get())
    while not (await asyncio.wait({get}, timeout=DISCONNECT_POLL_SECONDS))[0]:
        if await watch.is_disconnected():
            get.cancel()
            raise _ClientGone()
    return get.result()


async def _sse(
    reply: _Reply, first: Piece | Done, events: AsyncIterator[Piece | Done], include_usage: bool
) -> AsyncIterator[str]:
    """Server-sent events: the reply's chunks for each event, then [DONE]."""
    async with aclosing(events):
        for chunk in reply.opening():
            yield f"data: {chunk.model_dump_json()}\n\n"
        event = first
        while True:
            for chunk in reply.chunks(event, include_usage):
                yield f"data: {chunk.model_dump_json()}\n\n"
            if isinstance(event, Done):
                break
            event = await anext(events)
    yield "data: [DONE]\n\n"


# -- replies -------------------------------------------------------------------------------


class _Reply:
    """How an endpoint words its answer: whole, or as stream chunks (same id throughout)."""

    prefix = ""

    def __init__(self, s: Service, n_top: int | None) -> None:
        """n_top: None without log-probabilities, else the alternatives per token."""
        self.id = f"{self.prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = s.model_id
        self.tokenizer = s.model.tokenizer
        self.n_top = n_top

    def opening(self) -> list[BaseModel]:
        """Chunks sent before any text."""
        return []

    def chunks(self, event: Piece | Done, include_usage: bool) -> list[BaseModel]:
        """The stream chunks of one event (the last one ends with the finish reason)."""
        if isinstance(event, Piece):
            return [self.chunk(event.text, event.logprobs, None)]
        c = event.completion
        last = self.chunk("", event.logprobs, FINISH_REASONS[c.finish_reason])
        return [last, self.chunk_usage(self.usage(c))] if include_usage else [last]

    def whole(self, events: list[Piece | Done]) -> BaseModel:
        """The one JSON answer from every event of the request."""
        logprobs = [lp for e in events for lp in e.logprobs]
        return self.answer(events[-1].completion, logprobs)

    def usage(self, c: Completion) -> api.Usage:
        n_prompt, n_gen = len(c.prompt_ids), len(c.ids)
        details = api.PromptTokensDetails(cached_tokens=c.cached_tokens)
        return api.Usage(
            prompt_tokens=n_prompt,
            completion_tokens=n_gen,
            total_tokens=n_prompt + n_gen,
            prompt_tokens_details=details,
        )

    def text(self, token: int) -> str:
        """A token's text (control tokens shown), as logprobs name it."""
        return self.tokenizer.decode([token], special=True)

    def chunk(self, text: str, logprobs: list[Logprob], finish: str | None) -> BaseModel:
        raise NotImplementedError

    def chunk_usage(self, usage: api.Usage) -> BaseModel:
        raise NotImplementedError

    def answer(self, c: Completion, logprobs: list[Logprob]) -> BaseModel:
        raise NotImplementedError


class _TextReply(_Reply):
    """/v1/completions: text choices, logprobs in the legacy parallel-lists format."""

    prefix = "cmpl"

    def __init__(self, s: Service, n_top: int | None) -> None:
        super().__init__(s, n_top)
        self.offset = 0  # text_offset of the next token

    def chunk(self, text, logprobs, finish) -> api.CompletionResponse:
        choice = api.CompletionChoice(
            text=text, logprobs=self.logprobs(logprobs), finish_reason=finish
        )
        return self.response([choice])

    def chunk_usage(self, usage) -> api.CompletionResponse:
        return self.response([], usage)

    def answer(self, c, logprobs) -> api.CompletionResponse:
        choice = api.CompletionChoice(
            text=c.text,
            logprobs=self.logprobs(logprobs),
            finish_reason=FINISH_REASONS[c.finish_reason],
        )
        return self.response([choice], self.usage(c))

    def response(self, choices, usage=None) -> api.CompletionResponse:
        return api.CompletionResponse(
            id=self.id, created=self.created, model=self.model, choices=choices, usage=usage
        )

    def logprobs(self, logprobs: list[Logprob]) -> api.CompletionLogprobs | None:
        if self.n_top is None:
            return None
        tokens = [self.text(lp.token) for lp in logprobs]
        offsets = []
        for t in tokens:
            offsets.append(self.offset)
            self.offset += len(t)
        return api.CompletionLogprobs(
            tokens=tokens,
            token_logprobs=[lp.logprob for lp in logprobs],
            top_logprobs=[{self.text(i): v for i, v in lp.top} for lp in logprobs],
            text_offset=offsets,
        )


class _ChatReply(_Reply):
    """/v1/chat/completions: an assistant message, logprobs per token with alternatives."""

    prefix = "chatcmpl"

    def opening(self) -> list[api.ChatChunk]:
        return [self.response([api.ChatChunkChoice(delta=api.Delta(role="assistant"))])]

    def chunk(self, text, logprobs, finish) -> api.ChatChunk:
        choice = api.ChatChunkChoice(
            delta=api.Delta(content=text or None),
            logprobs=self.logprobs(logprobs),
            finish_reason=finish,
        )
        return self.response([choice])

    def chunk_usage(self, usage) -> api.ChatChunk:
        return self.response([], usage)

    def answer(self, c, logprobs) -> api.ChatResponse:
        choice = api.ChatChoice(
            message=api.ChatMessage(content=c.text),
            logprobs=self.logprobs(logprobs),
            finish_reason=FINISH_REASONS[c.finish_reason],
        )
        return api.ChatResponse(
            id=self.id,
            created=self.created,
            model=self.model,
            choices=[choice],
            usage=self.usage(c),
        )

    def response(self, choices, usage=None) -> api.ChatChunk:
        return api.ChatChunk(
            id=self.id, created=self.created, model=self.model, choices=choices, usage=usage
        )

    def logprobs(self, logprobs: list[Logprob]) -> api.ChatLogprobs | None:
        if self.n_top is None:
            return None
        return api.ChatLogprobs(
            content=[
                api.TokenLogprob(
                    **self.entry(lp.token, lp.logprob),
                    top_logprobs=[api.TopLogprob(**self.entry(i, v)) for i, v in lp.top],
                )
                for lp in logprobs
            ]
        )

    def entry(self, token: int, logprob: float) -> dict:
        text = self.text(token)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}


# -- errors and metrics --------------------------------------------------------------------


def _error(status: int, detail: api.ErrorDetail) -> JSONResponse:
    return JSONResponse(api.ErrorResponse(error=detail).model_dump(), status_code=status)


async def _on_api_error(request: Request, e: ApiError) -> JSONResponse:
    return _error(e.status, e.detail)


async def _on_invalid_body(request: Request, e: RequestValidationError) -> JSONResponse:
    """400 naming the first problem pydantic found (the field and what it should be)."""
    first = e.errors()[0]
    if first["type"] == "json_invalid":
        message, field = f"the body is not valid JSON ({first['ctx']['error']})", None
    else:
        field = _field(first["loc"], unknown=first["type"] == "extra_forbidden")
        message = f"{field or 'body'}: {first['msg']}"
    return _error(400, api.ErrorDetail(message=message, type="invalid_request_error", param=field))


def _field(loc: tuple, unknown: bool) -> str | None:
    """The field a validation error's location names ('messages.0.role'), without pydantic's
    'body' and union-member tags ('prompt.constrained-str' is 'prompt'); unknown: the last
    part is a field the schema does not have."""
    parts = [p for p in loc[1:-1] if isinstance(p, int) or p in FIELD_NAMES] + list(loc[-1:])
    if not (unknown or isinstance(parts[-1], int) or parts[-1] in FIELD_NAMES):
        parts.pop()
    return ".".join(map(str, parts)) or None


async def _on_http_error(request: Request, e: HTTPException) -> JSONResponse:
    kind = "invalid_request_error" if e.status_code < 500 else "server_error"
    return _error(e.status_code, api.ErrorDetail(message=str(e.detail), type=kind))


async def _on_bug(request: Request, e: Exception) -> JSONResponse:
    log.error("internal error on %s", request.url.path, exc_info=e)
    return _error(
        500, api.ErrorDetail(message="internal error; see the server log", type="server_error")
    )


def _prometheus(s: Service) -> str:
    """The metrics in Prometheus' text exposition format."""
    st, loop = s.loop.stats, s.loop
    busy = loop.busy_seconds
    rows = [
        ("requests_running", "gauge", "requests in the running batch", st.running),
        ("requests_waiting", "gauge", "requests queued in the engine", st.waiting),
        ("requests_in_flight", "gauge", "requests in the server", s.in_flight),
        ("requests_rejected_total", "counter", "requests answered 503 (server full)", s.rejected),
        ("prompt_tokens_total", "counter", "prompt tokens of admitted requests", st.prompt_tokens),
        (
            "prompt_tokens_cached_total",
            "counter",
            "prompt tokens from the prefix cache",
            st.cached_prompt_tokens,
        ),
        ("generation_tokens_total", "counter", "tokens generated", st.generated_tokens),
        (
            "generation_tokens_per_second",
            "gauge",
            "tokens generated per second of engine work",
            st.generated_tokens / busy if busy else 0.0,
        ),
        ("engine_steps_total", "counter", "forward calls", st.steps),
        ("engine_busy_seconds_total", "counter", "seconds spent in engine steps", busy),
        ("kv_blocks_used_ratio", "gauge", "KV blocks held by sequences / all", loop.kv_blocks_used),
        (
            "kv_utilisation",
            "gauge",
            "mean over steps of live token slots / allocated slots",
            st.kv_utilisation,
        ),
        (
            "prefix_cache_hit_rate",
            "gauge",
            "cached prompt tokens / prompt tokens",
            st.prefix_cache_hit_rate,
        ),
        ("preemptions_total", "counter", "sequences preempted (recomputed later)", st.preemptions),
    ]
    return "".join(
        f"# HELP refinfer_{name} {text}\n# TYPE refinfer_{name} {kind}\nrefinfer_{name} {value}\n"
        for name, kind, text, value in rows
    )
