"""``GET /openapi.json`` and the API page, ``GET /docs``.

The document is built once, when the app is made (engine.api.openapi). The page is Swagger UI
5 (it reads OpenAPI 3.1), from the files the ``swagger-ui-py`` package ships, served by
leadflow itself: no CDN, and no inline script (a small file of ours, ``leadflow-docs.js``,
points Swagger UI at the document).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping
from pathlib import Path

from engine.api import openapi, toolkit
from engine.api.toolkit import Request, Response

DOCS_HTML = b"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>leadflow API</title>
<link rel="stylesheet" href="/docs/static/swagger-ui.css">
</head>
<body>
<div id="swagger-ui"></div>
<script src="/docs/static/swagger-ui-bundle.js"></script>
<script src="/docs/static/leadflow-docs.js"></script>
</body>
</html>
"""

# ours: Swagger UI pointed at the document (a file, so the page needs no inline script)
OUR_JS = "leadflow-docs.js"
DOCS_JS = b"""window.addEventListener("load", function () {
  window.ui = SwaggerUIBundle({url: "/openapi.json", dom_id: "#swagger-ui", deepLinking: true});
});
"""

# the files of Swagger UI the page loads, by name, with their content type
STATIC_TYPES: Mapping[str, bytes] = {
    "swagger-ui.css": b"text/css; charset=utf-8",
    "swagger-ui-bundle.js": b"text/javascript; charset=utf-8",
    "favicon-32x32.png": b"image/png",
    "favicon-16x16.png": b"image/png",
}


def swagger_ui_dir() -> Path | None:
    """Where the ``swagger-ui-py`` package keeps Swagger UI's files (found without importing
    the package, whose own code leadflow does not use), or None if it is not installed."""
    spec = importlib.util.find_spec("swagger_ui")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "static"


class ApiDocs:
    """The handlers of the document, the page and its static files."""

    def __init__(self) -> None:
        self.document = openapi.document_json()
        self._dir = swagger_ui_dir()
        self._files: dict[str, bytes] = {OUR_JS: DOCS_JS}

    async def openapi(self, req: Request) -> Response:
        return Response(self.document)

    async def page(self, req: Request) -> Response:
        return Response(DOCS_HTML, content_type=b"text/html; charset=utf-8")

    async def static(self, req: Request) -> Response:
        name = req.params["file"]
        body = self._file(name)
        if body is None:
            return toolkit.error_response(404, "not_found", "no such file")
        ctype = b"text/javascript; charset=utf-8" if name == OUR_JS else STATIC_TYPES[name]
        return Response(body, content_type=ctype,
                        headers=[(b"cache-control", b"public, max-age=3600")])

    def _file(self, name: str) -> bytes | None:
        """One of the page's files (read once), or None: only the names listed are
        served, so no path from the request ever reaches the file system."""
        body = self._files.get(name)
        if body is None and name in STATIC_TYPES and self._dir is not None:
            try:
                body = self._files[name] = (self._dir / name).read_bytes()
            except OSError:
                return None
        return body
