"""``GET /api/docs``: the OpenAPI document in Swagger UI, served from files in the package.

The assets are swagger-ui-dist's, copied into ``api/docs_assets/`` by ``make docs-assets`` (the
network is closed when the server runs: no CDN). Without them the page says how to get them.
"""

from __future__ import annotations

from pathlib import Path

from tornado.web import RequestHandler, StaticFileHandler

from .backendai.errors import BACKENDAI
from .base import BaseHandler

ASSETS = Path(__file__).parent / "docs_assets"

PAGE = """<!doctype html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <title>kernel-bridge API</title>
  <link rel="stylesheet" href="/api/docs/swagger-ui.css">
</head>
<body>
  <div id="ui"></div>
  <script src="/api/docs/swagger-ui-bundle.js"></script>
  <script>
    SwaggerUIBundle({url: "/api/openapi.json", dom_id: "#ui", deepLinking: true,
                     persistAuthorization: true});
  </script>
</body>
</html>
"""

MISSING = ("The API docs page needs swagger-ui-dist's files in {dir}: run `make docs-assets`. "
           "The document itself is at /api/openapi.json.")


class DocsHandler(BaseHandler):
    """The page: no auth, like the document it shows."""

    dialect = BACKENDAI
    auth_required = False

    def get(self) -> None:
        if not (ASSETS / "swagger-ui-bundle.js").is_file():
            self.set_status(503)
            self.set_header("Content-Type", "text/plain; charset=utf-8")
            self.finish(MISSING.format(dir=ASSETS))
            return
        self.set_header("Content-Type", "text/html; charset=utf-8")
        self.finish(PAGE)


def routes() -> list[tuple[str, type[RequestHandler], dict[str, str]]]:
    return [(r"/api/docs/(swagger-ui-bundle\.js|swagger-ui\.css)", StaticFileHandler,
             {"path": str(ASSETS)})]
