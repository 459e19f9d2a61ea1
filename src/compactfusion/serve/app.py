"""The HTTP side (rank 0 only): FastAPI routes over a ``ServerState``; the group loop answers the futures."""
import asyncio
import hmac
import time
import uuid
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError

from .metrics import Metrics
from .scheduler import NotAccepting, QueueFull, Scheduler
from .schemas import Limits, request_model, to_job


@dataclass
class ServerState:
    limits: Limits
    scheduler: Scheduler
    metrics: Metrics
    api_key: str | None = None
    world_size: int = 1
    check_prompt: object = None
    status: str = "loading"  # loading -> ready -> draining | failed
    reason: str = "the model is loading"
    ranks: list = field(default_factory=list)
    request_model: type = None

    def __post_init__(self):
        self.request_model = request_model(self.limits, self.check_prompt)

    def set(self, status: str, reason: str = "") -> None:
        self.status, self.reason = status, reason
        self.metrics.healthy.set(1 if status == "ready" else 0)


def error(status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
          headers: dict | None = None) -> JSONResponse:
    """OpenAI-style error body."""
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": status}},
                        status_code=status, headers=headers)


def _validation_error(e: ValidationError) -> JSONResponse:
    errs = e.errors(include_url=False)
    first = errs[0]
    param = ".".join(str(x) for x in first.get("loc", ())) or "body"
    msg = "; ".join(f"{'.'.join(str(x) for x in d.get('loc', ())) or 'body'}: {d.get('msg')}" for d in errs)
    resp = error(422, msg, param)
    return resp


def create_app(state: ServerState) -> FastAPI:
    app = FastAPI(title="compactfusion", docs_url=None, redoc_url=None, openapi_url=None)

    def unauthorized(request: Request):
        if state.api_key is None:
            return None
        got = request.headers.get("authorization", "")
        if not hmac.compare_digest(got.encode(), f"Bearer {state.api_key}".encode()):
            return error(401, "missing or wrong API key: send 'Authorization: Bearer <key>'", kind="authentication_error")
        return None

    @app.get("/health")
    async def health():
        body = {"status": state.status, "world_size": state.world_size, "ranks": state.ranks,
                "queue_depth": state.scheduler.depth(), "in_flight": state.scheduler.in_flight}
        if state.status != "ready":
            body["reason"] = state.reason
            return JSONResponse(body, status_code=503)
        return body

    @app.get("/metrics")
    async def metrics():
        state.metrics.queue_depth.set(state.scheduler.depth())
        return Response(state.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models(request: Request):
        if (r := unauthorized(request)) is not None:
            return r
        lim = state.limits
        return {"object": "list", "data": [{
            "id": lim.model_id, "object": "model", "owned_by": "compactfusion", "world_size": state.world_size,
            "codecs": list(lim.codecs), "default_codec": lim.default_codec,
            "limits": {"max_n": lim.max_n, "max_steps": lim.max_steps, "max_side": lim.max_side},
            "default_size": f"{lim.default_size[0]}x{lim.default_size[1]}"}]}

    @app.post("/v1/images/generations")
    async def generate(request: Request):
        if (r := unauthorized(request)) is not None:
            return r
        if state.status != "ready":
            state.metrics.requests.labels("rejected").inc()
            return error(503, f"not accepting requests: {state.reason}", kind="server_unavailable",
                         headers={"Retry-After": "5"} if state.status == "loading" else None)
        try:
            body = await request.json()
        except ValueError:
            return error(422, "body: the request body must be a JSON object", "body")
        if not isinstance(body, dict):
            return error(422, "body: the request body must be a JSON object", "body")
        try:
            req = state.request_model.model_validate(body)
        except ValidationError as e:
            return _validation_error(e)
        job = to_job(req, state.limits, "img-" + uuid.uuid4().hex[:16])
        try:
            entry = state.scheduler.submit(job)
        except QueueFull as e:
            state.metrics.requests.labels("rejected").inc()
            return error(429, str(e), kind="rate_limit_error", headers={"Retry-After": str(e.retry_after_s)})
        except NotAccepting as e:
            state.metrics.requests.labels("rejected").inc()
            return error(503, f"not accepting requests: {e}", kind="server_unavailable")
        state.metrics.queue_depth.set(state.scheduler.depth())
        status, payload = await asyncio.wrap_future(entry.future)
        if status != 200:
            return error(status, payload, kind="server_error" if status >= 500 else "invalid_request_error")
        return dict(payload, id=job.id, created=int(time.time()))

    return app
