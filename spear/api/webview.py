"""The web view (CONTRACT §5, `GET /`): the files in spear/api/web/ served as they are, with no
build step and no external assets; a Content-Security-Policy holds the page to its own origin.
The page is a client of the HTTP API like any other, so it needs no route of its own beyond these."""

from __future__ import annotations

from importlib import resources

from aiohttp import web

from spear.api.openapi import Route

FILES = {  # path -> (file in spear/api/web/, media type)
    "/": ("index.html", "text/html"),
    "/web/app.css": ("app.css", "text/css"),
    "/web/app.js": ("app.js", "text/javascript"),
    "/web/favicon.svg": ("favicon.svg", "image/svg+xml"),
}
POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
    "base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
_CONTENT = {path: (resources.files("spear.api") / "web" / name).read_bytes() for path, (name, _) in FILES.items()}


async def web_view(request: web.Request) -> web.Response:
    """GET /: the bundled web view (one HTML page)."""
    _, media = FILES[request.path]
    headers = {
        "Cache-Control": "no-cache",  # an upgraded server serves its own view at once
        "Content-Security-Policy": POLICY,
        "X-Content-Type-Options": "nosniff",
    }
    return web.Response(body=_CONTENT[request.path], content_type=media, charset="utf-8", headers=headers)


ROUTES = [
    Route(
        "GET",
        path,
        web_view,
        "The web view: executions live, an execution's timeline, tasks, workers"
        if path == "/"
        else f"web view: {name}",
        responses={200: (media, {"type": "string"})},
        errors=(404, 500),
        role=None,  # the page holds no data: it asks the API, which checks the token
        name="web_view" if path == "/" else "web_" + name.replace(".", "_"),
    )
    for path, (name, media) in FILES.items()
]
