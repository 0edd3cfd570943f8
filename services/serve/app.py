"""`cofeat serve`: similar projects and recommendations over HTTP (FastAPI).

    GET  /v1/projects/{project_id}/similar?k=10&exclude_owner=false
    POST /v1/similar?k=10                      multipart field `image`
    GET  /v1/users/{user_id}/recommendations?k=20&new_only=false&published_since=ISO8601
    GET  /healthz  /readyz  /metrics  /openapi.json  /docs

Query endpoints need `Authorization: Bearer <COFEAT_API_TOKEN>` when that is set; it is
checked before any of the request body is read. Image queries run at most
COFEAT_SERVE_IMAGE_CONCURRENCY at a time; the others wait up to COFEAT_SERVE_IMAGE_WAIT_S,
then get 503 with Retry-After.
"""

from __future__ import annotations

import gc
import hmac
import logging
import math
import threading
import time
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Annotated, Any

import anyio
from fastapi import (
    APIRouter,
    Depends,
    FastAPI,
    File,
    HTTPException,
    Path,
    Query,
    Request,
    UploadFile,
)
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPBearer
from fastapi.security.utils import get_authorization_scheme_param
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Gauge, Histogram, generate_latest
from pydantic import BaseModel, SecretStr
from pymilvus.exceptions import MilvusException

from services.serve.lazy import LazyMilvus
from services.serve.live import BadImage, ModelHolder, NoModel, embed_bytes
from shared.client import CofeatClient, Hit, NotFound, epoch_ms
from shared.milvus import connect as connect_milvus
from shared.settings import Settings

log = logging.getLogger("cofeat.serve")

MAX_K = 100  # bounds result sizes (and HNSW's ef, which must be >= k)
ID_MAX = 2**63 - 1  # Milvus INT64 primary keys
# Multipart framing around the image: boundaries and part headers.
MULTIPART_SLACK = 64 * 1024

REQUESTS = Counter("cofeat_serve_requests_total", "HTTP requests answered",
                   ["route", "status"])
LATENCY = Histogram("cofeat_serve_request_seconds", "HTTP request latency", ["route"],
                    buckets=(0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5))
IMAGE_QUERIES = Gauge("cofeat_serve_image_queries", "image queries decoding and embedding "
                      "(running) or waiting for a slot (waiting)", ["state"])
IMAGE_BUSY = Counter("cofeat_serve_image_busy_total",
                     "image queries answered 503 after waiting COFEAT_SERVE_IMAGE_WAIT_S")


class HitOut(BaseModel):
    project_id: int
    score: float
    owner_id: int
    published_at: int
    model_version: int


class Results(BaseModel):
    query: dict[str, Any]
    results: list[HitOut]


def results(query: dict, hits: list[Hit]) -> JSONResponse:
    # A Response skips FastAPI's re-validation against `Results` (~1 ms a request); the
    # model still documents the shape in /openapi.json.
    return JSONResponse({"query": query, "results": [hit.as_dict() for hit in hits]})


# -- app ------------------------------------------------------------------------------


def create_app(settings: Settings, client: CofeatClient | None = None,
               models: ModelHolder | None = None, watch: bool = True) -> FastAPI:
    # Connected on first use: serve starts, and says it is not ready, while Milvus is down.
    client = client or CofeatClient.from_settings(
        settings, milvus=LazyMilvus(lambda: connect_milvus(settings, dedicated=True)))
    models = models or ModelHolder(settings, client)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        stop = threading.Event()
        try:
            models.refresh()
        except Exception:
            log.exception("loading the CNN model failed; image search is off until it loads")
        # The start-up objects (torch, pymilvus, the app) live as long as the process: out
        # of the collector's full passes, which otherwise stall a request for tens of ms.
        gc.collect()
        gc.freeze()
        if watch:
            threading.Thread(target=models.watch, args=(stop,), daemon=True,
                             name="model-watch").start()
        yield
        stop.set()
        models.close()

    # max_body_size: FastAPI answers 413 while reading, before multipart parsing buffers.
    app = FastAPI(title="cofeat query API", version="1", lifespan=lifespan,
                  description="Similar projects and recommendations from cofeat's vectors.",
                  max_body_size=settings.serve_max_upload_bytes + MULTIPART_SLACK)
    app.state.settings, app.state.client, app.state.models = settings, client, models
    app.state.image_slots = ImageSlots(settings.serve_image_concurrency,
                                       settings.serve_image_wait_s)
    app.include_router(health)
    # BEARER only documents the scheme in /openapi.json; BearerGuard enforces it.
    app.include_router(queries, dependencies=[Depends(BEARER)])
    app.add_exception_handler(NotFound, _not_found)
    app.add_exception_handler(MilvusException, _milvus_down)
    app.add_middleware(BearerGuard, token=settings.api_token, prefix=queries.prefix + "/")
    app.add_middleware(Metrics)  # outermost: refused requests are counted too
    return app


BEARER = HTTPBearer(auto_error=False)


class BearerGuard:
    """Refuses a query without the bearer token before any of its body is read (plain
    ASGI: `receive` is never called), so a refused upload is neither parsed nor spooled.
    A refusal that leaves a body unread closes the connection: the server stops reading
    it instead of draining it. Paths outside `prefix` (health, metrics, docs) are open."""

    def __init__(self, app, token: SecretStr | None, prefix: str) -> None:
        self.app = app
        self.expected = token.get_secret_value().encode() if token else None
        self.prefix = prefix

    async def __call__(self, scope, receive, send) -> None:
        if (scope["type"] != "http" or self.expected is None
                or not scope["path"].startswith(self.prefix) or self._allowed(scope)):
            return await self.app(scope, receive, send)
        scope["cofeat.route"] = "unauthorized"  # the label Metrics gives it
        headers = {"WWW-Authenticate": "Bearer"}
        if _announces_body(scope):
            headers["Connection"] = "close"
        response = JSONResponse({"detail": "missing or wrong bearer token"}, 401, headers)
        await response(scope, receive, send)

    def _allowed(self, scope) -> bool:
        header = _header(scope, b"authorization")
        scheme, credentials = get_authorization_scheme_param(header)
        given = credentials.encode() if scheme.lower() == "bearer" else b""
        # compare_digest: the time taken does not reveal how much of the token matched.
        return hmac.compare_digest(given, self.expected)


def _header(scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key.lower() == name:
            return value.decode("latin-1")
    return None


def _announces_body(scope) -> bool:
    length = _header(scope, b"content-length")
    return _header(scope, b"transfer-encoding") is not None or (length or "0").strip() != "0"


class ImageSlots:
    """At most `size` image queries decode and embed at once: each may hold a decoded image
    of up to COFEAT_SERVE_MAX_IMAGE_PIXELS and the CNN's activations. Others wait up to
    `wait_s` in the event loop, not in a worker thread (the other queries need those),
    and are then answered 503 with Retry-After."""

    def __init__(self, size: int, wait_s: float) -> None:
        self.size, self.wait_s = size, wait_s
        self.free = anyio.Semaphore(size)

    @asynccontextmanager
    async def hold(self):
        try:
            self.free.acquire_nowait()
        except anyio.WouldBlock:
            await self._wait()
        IMAGE_QUERIES.labels("running").inc()
        try:
            yield
        finally:
            IMAGE_QUERIES.labels("running").dec()
            self.free.release()

    async def _wait(self) -> None:
        IMAGE_QUERIES.labels("waiting").inc()
        try:
            with anyio.move_on_after(self.wait_s) as waited:
                await self.free.acquire()
        finally:
            IMAGE_QUERIES.labels("waiting").dec()
        if waited.cancelled_caught:
            IMAGE_BUSY.inc()
            raise HTTPException(
                503, f"image search is busy ({self.size} image queries at once); retry later",
                headers={"Retry-After": str(max(1, math.ceil(self.wait_s)))})


async def image_slot(request: Request):
    """Dependency of the image routes: the query's slot for as long as the route runs."""
    async with request.app.state.image_slots.hold():
        yield


async def _not_found(request: Request, error: NotFound) -> JSONResponse:
    return JSONResponse({"detail": str(error)}, status_code=404)


async def _milvus_down(request: Request, error: MilvusException) -> JSONResponse:
    log.error("Milvus query failed: %s", error)
    return JSONResponse({"detail": f"vector store unavailable: {error.message}"},
                        status_code=503)


# -- routes ---------------------------------------------------------------------------

health = APIRouter(tags=["health"])
queries = APIRouter(prefix="/v1", tags=["queries"])

K = Annotated[int, Query(ge=1, le=MAX_K, description="number of results")]


@health.get("/healthz")
def healthz() -> dict:
    """The process is alive."""
    return {"status": "ok"}


@health.get("/readyz")
def readyz(request: Request) -> JSONResponse:
    """Milvus answers, the projects alias exists and a CNN model is loaded for image search.

    A missing users alias is only a warning: the embedder builds no user vectors for a
    model outside factor space, and similar-project queries still work then."""
    client, models = request.app.state.client, request.app.state.models
    problems, warnings = [], []
    try:
        # One listing rather than describe_alias per alias: a missing alias is not an
        # RPC error, so probes do not fill the log with pymilvus tracebacks.
        present = set(client.milvus.list_aliases(timeout=2.0)["aliases"])
        if client.projects not in present:
            problems.append(f"alias {client.projects} does not exist")
        if client.users not in present:
            warnings.append(f"alias {client.users} does not exist: no recommendations")
    except MilvusException as error:
        problems.append(f"Milvus does not answer: {error.message}")
    live = models.live
    if live is None:
        problems.append("no CNN model is live for image search")
    body = {"ready": not problems, "problems": problems, "warnings": warnings,
            "cnn_version": live.version if live else None}
    return JSONResponse(body, status_code=503 if problems else 200)


@health.get("/metrics", include_in_schema=False)
def metrics() -> Response:
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)


@queries.get("/projects/{project_id}/similar", response_model=Results)
def similar_to_project(request: Request, project_id: Annotated[int, Path(ge=0, le=ID_MAX)],
                       k: K = 10, exclude_owner: bool = False) -> JSONResponse:
    """Projects nearest to this one (never itself); `exclude_owner` drops the owner's."""
    hits = request.app.state.client.similar_to_project(project_id, k, exclude_owner)
    return results({"project_id": project_id, "k": k, "exclude_owner": exclude_owner}, hits)


@queries.post("/similar", response_model=Results,
              dependencies=[Depends(image_slot, scope="function")],
              responses={400: {"description": "not an image"},
                         413: {"description": "upload too large"},
                         503: {"description": "no CNN model is live, or image search is "
                                              "busy (Retry-After)"}})
def similar_to_image(request: Request, image: Annotated[UploadFile, File()],
                     k: K = 10) -> JSONResponse:
    """Projects nearest to an uploaded image, embedded with the CNN behind the vectors."""
    settings: Settings = request.app.state.settings
    data = image.file.read(settings.serve_max_upload_bytes + 1)
    if len(data) > settings.serve_max_upload_bytes:
        raise HTTPException(413, f"image larger than {settings.serve_max_upload_bytes} bytes")
    models, client = request.app.state.models, request.app.state.client
    try:
        live = models.require()
        hits = client.similar_to_vector(embed_bytes(live, data, settings), k)
        if hits and hits[0].model_version != live.version and models.refresh() is not live:
            # The alias moved since the last periodic check: embed again with its model.
            live = models.require()
            vector = embed_bytes(live, data, settings)
            hits = client.similar_to_vector(vector, k)
    except NoModel as error:
        raise HTTPException(503, str(error)) from None
    except BadImage as error:
        raise HTTPException(400, str(error)) from None
    return results({"cnn_version": live.version, "k": k}, hits)


@queries.get("/users/{user_id}/recommendations", response_model=Results)
def for_user(request: Request, user_id: Annotated[int, Path(ge=0, le=ID_MAX)],
             k: K = 20, new_only: bool = False,
             published_since: Annotated[datetime | None, Query(
                 description="only projects published at or after this time (ISO 8601; "
                             "UTC when it names no zone); overrides new_only's window")] = None,
             ) -> JSONResponse:
    """Projects closest to the user's vector; `new_only`: published within the window."""
    since_ms = epoch_ms(published_since) if published_since else None
    hits = request.app.state.client.for_user(user_id, k, new_only, new_since_ms=since_ms)
    query = {"user_id": user_id, "k": k, "new_only": new_only}
    if published_since:
        query["published_since_ms"] = since_ms
    return results(query, hits)


# -- metrics (plain ASGI: cheaper than BaseHTTPMiddleware on every request) -------------


class Metrics:
    """cofeat_serve_requests_total{route,status} and cofeat_serve_request_seconds{route},
    labelled by route template so ids do not explode the label set."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started, status = time.perf_counter(), 500

        async def send_status(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = _route(scope)
            REQUESTS.labels(route, str(status)).inc()
            LATENCY.labels(route).observe(time.perf_counter() - started)


def _route(scope) -> str:
    return (getattr(scope.get("route"), "path", None) or scope.get("cofeat.route")
            or "unmatched")
