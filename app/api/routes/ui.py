"""/ui: the web playground (A/B, jobs, versions), served by the API itself.

The page and its assets are plain files from `app/api/ui/static/` and need no API key: the page
asks for one and sends it with every /v1 call it makes. Only the files shipped there are served
(looked up by name, never by a path taken from the request).
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

from app.api.errors import ApiError

STATIC = Path(str(files("app.api.ui") / "static"))
INDEX = "index.html"
MEDIA_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
}
# The page loads only its own files and talks only to its own origin; DOM text is never markup.
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
HEADERS = {
    "Cache-Control": "no-cache",  # revalidated (ETag) on every load: a new release shows at once
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}

router = APIRouter(prefix="/ui", tags=["ui"], include_in_schema=False)


def _assets() -> dict[str, Path]:
    return {
        path.name: path
        for path in STATIC.iterdir()
        if path.is_file() and path.suffix in MEDIA_TYPES and path.name != INDEX
    }


ASSETS = _assets()


def _file(path: Path) -> FileResponse:
    return FileResponse(path, media_type=MEDIA_TYPES[path.suffix], headers=HEADERS)


@router.get("")
@router.get("/")
def index() -> FileResponse:
    """The playground: one page; its views are addressed by the fragment (#/ab, #/jobs/ID, ...)."""
    return _file(STATIC / INDEX)


@router.get("/{name}")
def asset(name: str) -> FileResponse:
    path = ASSETS.get(name)
    if path is None:
        raise ApiError(404, f"no playground file {name!r}", param="name", code="not_found")
    return _file(path)
