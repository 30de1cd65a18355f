"""`cbir serve`: a web page and a JSON API over one database, with the model and the search
structures loaded once (FastAPI on uvicorn).

Safe by default: it binds 127.0.0.1, never writes the database, and serves only files the
catalog lists, found by image id: no text from a request ever becomes a filesystem path.
Uploads are capped and decoded with the guards of indexing. Each request sees the database as
last committed, so a `cbir add` beside it is picked up without a restart.
"""

from __future__ import annotations

import asyncio
import io
import mimetypes
import socket
import threading
from collections import OrderedDict
from collections.abc import AsyncGenerator, Callable
from importlib import resources
from pathlib import Path
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.middleware.trustedhost import TrustedHostMiddleware

from cbir import categories
from cbir.api import ImageDatabase, result_json
from cbir.errors import BadImage, CbirError
from cbir.images import thumbnail
from cbir.query import QueryResult
from cbir.search import DEFAULT_MIN_CANDIDATES

DEFAULT_MAX_UPLOAD_BYTES = 20 * 1024 * 1024
MAX_RESULTS = 200  # n per query
MAX_MIN_CANDIDATES = 100_000  # a gate's budget per query (the CLI's --min-candidates)
MAX_PAGE = 500  # images per page of a category
THUMBNAIL_SIDE = 256
THUMBNAIL_CACHE = 2048  # thumbnails kept in memory (about 15 kB each)
FORM_OVERHEAD = 64_000  # bytes a form may add to its file (boundaries, headers, n, all)


class _TooLarge(Exception):
    """An upload passed its byte budget while it was being read."""


def create_app(
    db: ImageDatabase,
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
    allowed_hosts: list[str] | None = None,
) -> FastAPI:
    """The application: the page at /, the JSON API under /api (OpenAPI at /openapi.json).
    `allowed_hosts`: the Host headers answered (others get 400), so that a web page whose
    name is re-pointed at 127.0.0.1 (DNS rebinding) cannot read the API; None: any."""
    app = FastAPI(title="cbir", description=f"Image search over {db.db_dir}", version="1")
    if allowed_hosts is not None:
        app.add_middleware(TrustedHostMiddleware, allowed_hosts=allowed_hosts)
    thumbnails = _ThumbnailCache(db, THUMBNAIL_CACHE)
    page = resources.files("cbir").joinpath("data/page.html").read_text(encoding="utf-8")

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def index() -> str:
        return page

    @app.post("/api/query", summary="Query by an uploaded image (multipart field 'image')")
    async def query_upload(
        request: Request, n: int = 10, all: bool = False,  # noqa: A002
        min_candidates: int = DEFAULT_MIN_CANDIDATES,
    ) -> dict:
        _check_n(n)
        _check_min_candidates(min_candidates)
        declared = request.headers.get("content-length")
        too_long = declared is not None and declared.isdigit() and (
            int(declared) > max_upload_bytes + FORM_OVERHEAD)  # fmt: skip
        if too_long:
            raise _too_large(max_upload_bytes)
        form = await _read_form(request, max_upload_bytes)
        upload = form.get("image")
        if upload is None or isinstance(upload, str):
            raise HTTPException(400, "send the image as a multipart file field named 'image'")
        data = await upload.read()
        if len(data) > max_upload_bytes:
            raise _too_large(max_upload_bytes)
        n = _form_int(form, "n", n)
        search_all = _form_bool(form, "all", all)
        name = _safe_name(upload.filename or "upload")
        try:
            result = await run_in_threadpool(lambda: db.query(
                data, n, search_all, min_candidates=min_candidates, name=name))  # fmt: skip
        except BadImage as bad:
            raise HTTPException(400, f"not a usable image: {bad.reason}") from None
        return _with_urls(result)

    @app.get("/api/query", summary="Query by an image the database holds (itself left out)")
    def query_id(
        id: str, n: int = 10, all: bool = False,  # noqa: A002
        min_candidates: int = DEFAULT_MIN_CANDIDATES,
    ) -> dict:
        _check_n(n)
        _check_min_candidates(min_candidates)
        image_id = _parse_id(id)
        try:
            return _with_urls(db.query_id(image_id, n, all, min_candidates=min_candidates))
        except KeyError:
            raise HTTPException(404, f"no image {image_id} in the database") from None

    @app.get("/api/info", summary="What `cbir info --json` prints")
    def info() -> dict:
        return db.info()

    @app.get("/api/categories", summary="The categories, largest first")
    def category_list() -> dict:
        cats = db.categories()
        images = db.database.n_images()
        return {"images": images,
                "categories": [{"id": c.id, "name": c.name, "images": c.images} for c in cats]}

    @app.get("/api/categories/{wnid}", summary="A page of one category's images")
    def category_page(wnid: str, offset: int = 0, limit: int = 60) -> dict:
        if offset < 0 or not 1 <= limit <= MAX_PAGE:
            raise HTTPException(400, f"offset must be >= 0 and limit between 1 and {MAX_PAGE}")
        if not categories.is_wnid(wnid):
            raise HTTPException(404, "no such category")
        try:
            total, page = db.category_images(wnid, offset, limit)
        except KeyError:
            raise HTTPException(404, "the database has no image in that category") from None
        return {"id": wnid, "name": categories.names_by_wnid()[wnid], "total": total,
                "offset": offset, "limit": limit,
                "images": [{"id": im.id, "path": im.path, "paths": list(im.paths),
                            "categories": list(im.categories), **_urls(im.id)}
                           for im in page]}  # fmt: skip

    @app.get("/api/images/{id}", summary="An image's file, as stored")
    def image_file(id: str) -> Response:
        found = db.image_bytes(_parse_id(id))
        if found is None:
            raise HTTPException(404, "no such image")
        name, data = found
        media = mimetypes.guess_type(name)[0] or "application/octet-stream"
        if not media.startswith("image/"):
            media = "application/octet-stream"
        return Response(data, media_type=media, headers=_PRIVATE_FILE)

    @app.get("/api/thumbnails/{id}", summary=f"An image at most {THUMBNAIL_SIDE} px, as JPEG")
    def image_thumbnail(id: str) -> Response:
        data = thumbnails.get(_parse_id(id))
        if data is None:
            raise HTTPException(404, "no such image")
        return Response(data, media_type="image/jpeg", headers=_PRIVATE_FILE)

    @app.exception_handler(CbirError)
    def database_error(request: Request, exc: CbirError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=500)

    return app


# Ids come from content hashes, so an id's file never changes; nothing is sniffed.
_PRIVATE_FILE = {"Cache-Control": "private, max-age=86400", "X-Content-Type-Options": "nosniff"}


def _with_urls(result: QueryResult) -> dict[str, Any]:
    data = result_json(result)
    for hit in data["results"]:
        hit.update(_urls(hit["id"]))
    return data


def _urls(image_id: int) -> dict[str, str]:
    return {"image": f"/api/images/{image_id}", "thumbnail": f"/api/thumbnails/{image_id}"}


def _parse_id(text: str) -> int:
    """An image id (a signed 64-bit integer); anything else is a 404, like an unknown id."""
    stripped = text[1:] if text.startswith("-") else text
    if not stripped.isascii() or not stripped.isdigit() or len(stripped) > 19:
        raise HTTPException(404, "no such image")
    value = int(text)
    if not -(1 << 63) <= value < (1 << 63):
        raise HTTPException(404, "no such image")
    return value


def _check_n(n: int) -> None:
    if not 1 <= n <= MAX_RESULTS:
        raise HTTPException(400, f"n must be between 1 and {MAX_RESULTS}")


def _check_min_candidates(min_candidates: int) -> None:
    if not 0 <= min_candidates <= MAX_MIN_CANDIDATES:
        raise HTTPException(400, f"min_candidates must be between 0 and {MAX_MIN_CANDIDATES}")


def _form_int(form: Any, key: str, default: int) -> int:
    value = form.get(key)
    if value is None:
        return default
    if not isinstance(value, str) or not (value.isascii() and value.isdigit()):
        raise HTTPException(400, f"{key} must be a number")
    _check_n(int(value))
    return int(value)


def _form_bool(form: Any, key: str, default: bool) -> bool:
    value = form.get(key)
    if value is None:
        return default
    return isinstance(value, str) and value.lower() in ("1", "true", "yes", "on")


def _safe_name(name: str) -> str:
    """An upload's name for display only (never a path): its last part, printable, short."""
    last = name.replace("\\", "/").rsplit("/", 1)[-1]
    printable = "".join(c if c.isprintable() else "?" for c in last)
    return printable[:120] or "upload"


def _too_large(limit: int) -> HTTPException:
    return HTTPException(413, f"upload over the {limit // (1024 * 1024)} MB limit "
                              "(cbir serve --max-upload-mb)")  # fmt: skip


async def _read_form(request: Request, limit: int) -> Any:
    """The multipart form, read while counting: past `limit` bytes (plus room for the form's
    own fields) it is a 413, whatever Content-Length said."""
    budget = limit + FORM_OVERHEAD

    async def capped() -> AsyncGenerator[bytes, None]:
        seen = 0
        async for chunk in request.stream():
            seen += len(chunk)
            if seen > budget:
                raise _TooLarge
            yield chunk

    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise HTTPException(400, "send a multipart/form-data form with a file field 'image'")
    try:
        return await MultiPartParser(request.headers, capped(), max_files=1, max_fields=8,
                                     max_part_size=4096).parse()  # fmt: skip
    except _TooLarge:
        raise _too_large(limit) from None
    except MultiPartException as exc:
        raise HTTPException(400, f"malformed form: {exc.message}") from None


class _ThumbnailCache:
    """JPEG thumbnails by image id, the most recently used THUMBNAIL_CACHE kept in memory
    (the database is never written)."""

    def __init__(self, db: ImageDatabase, capacity: int) -> None:
        self.db = db
        self.capacity = capacity
        self._cache: OrderedDict[int, bytes] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, image_id: int) -> bytes | None:
        with self._lock:
            cached = self._cache.get(image_id)
            if cached is not None:
                self._cache.move_to_end(image_id)
        if cached is not None:  # served only while the catalog still lists the image
            return cached if self.db.image(image_id) is not None else None
        found = self.db.image_bytes(image_id)  # None if the catalog does not list it
        if found is None:
            return None
        name, data = found
        try:
            small = thumbnail(Path(name), THUMBNAIL_SIDE, data)
        except BadImage:
            return None
        out = io.BytesIO()
        small.save(out, "JPEG", quality=82)
        jpeg = out.getvalue()
        with self._lock:
            self._cache[image_id] = jpeg
            while len(self._cache) > self.capacity:
                self._cache.popitem(last=False)
        return jpeg


def serve(
    db: ImageDatabase,
    host: str = "127.0.0.1",
    port: int = 8000,
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
    on_ready: Callable[[str], None] | None = None,
) -> None:
    """Serve until interrupted. The model and the search matrix are loaded first, so the
    first request is as fast as the rest; `on_ready` gets the URL once it accepts requests
    (port 0: the port the system chose)."""
    import uvicorn

    db.warm_up()
    loopback = ["127.0.0.1", "localhost", "::1"]
    app = create_app(db, max_upload_bytes,
                     [*loopback, "[::1]"] if host in loopback else None)  # fmt: skip
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    bound = sock.getsockname()[1]
    shown_host = f"[{host}]" if family == socket.AF_INET6 else host
    url = f"http://{shown_host}:{bound}/"

    class Server(uvicorn.Server):
        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            await super().startup(sockets)
            if not self.should_exit and on_ready is not None:
                on_ready(url)

    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off")
    server = Server(config)
    try:
        asyncio.run(server.serve(sockets=[sock]))
    finally:
        sock.close()
