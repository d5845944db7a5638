"""docs/protocol.md (and, for the Tinker routes, docs/tinker.md) must name
every route the coordinator registers."""

from pathlib import Path

from rewardsignal.coordinator.app import make_app
from rewardsignal.coordinator.config import CoordinatorConfig

DOCS = Path(__file__).resolve().parent.parent / "docs"


def test_every_registered_route_is_documented(tmp_path):
    app = make_app(CoordinatorConfig(data_dir=tmp_path))
    text = (DOCS / "protocol.md").read_text() + (DOCS / "tinker.md").read_text()
    routes = {(r.method, r.resource.canonical) for r in app.router.routes()
              if r.method != "HEAD"}
    assert len(routes) >= 15
    # The route must appear whole: followed by the closing backtick or a query.
    missing = [f"{m} {path}" for m, path in sorted(routes)
               if f"`{m} {path}`" not in text and f"`{m} {path}?" not in text]
    assert not missing, f"docs/protocol.md / docs/tinker.md do not document: {missing}"
