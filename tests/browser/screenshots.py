"""`make screenshots`: PNGs of the web UI's main pages, from a real server with real data.

python -m tests.browser.screenshots docs/screenshots
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from peftreg.sdk.client import Client
from tests.browser.conftest import ADMIN_TOKEN, SERVER_ENV, chromium, login, seed
from tests.fixtures.server import start_registry

PAGES = {
    "repositories": "/ui/",
    "versions": "/ui/r/acme/bot",
    "version-card": "/ui/r/acme/bot/-/versions/v2",
    "compare": "/ui/compare?a=acme/bot:v1&b=acme/bot:v2",
    "lineage": "/ui/r/acme/bot/-/lineage/v1",
    "tag-history": "/ui/r/acme/bot/-/tags/prod",
    "jobs": "/ui/jobs",
    "tokens": "/ui/tokens",
}


def main(output: Path) -> None:
    output.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        server = start_registry(root / "home", SERVER_ENV)
        try:
            client = Client(server.url, token=ADMIN_TOKEN, cache=root / "cache")
            data = seed(server, client, root / "artifacts")
            with chromium() as browser:
                page = browser.new_page(viewport={"width": 1280, "height": 860})
                login(page, server.url, ADMIN_TOKEN)
                shots = {**PAGES, "job": f"/ui/jobs/{data.export_job}"}
                for name, path in shots.items():
                    page.goto(server.url + path)
                    page.screenshot(path=str(output / f"{name}.png"), full_page=True)
                    print(output / f"{name}.png")
        finally:
            server.stop()


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "docs/screenshots"))
