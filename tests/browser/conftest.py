"""A real `peftreg serve` with pushed adapters, a base and a finished export, and a
headless Chromium (Debian's `chromium`) driven by Playwright, with axe-core injected.

Setup the suite needs: `apt-get install -y chromium` and
`npm ci --prefix tests/browser` (axe-core, pinned in package-lock.json).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from playwright.sync_api import Browser, BrowserContext, Page, sync_playwright

from peftreg.sdk.client import Client
from tests.fixtures.server import RegistryProcess, start_registry
from tests.jobs.artifacts import lora_dir, push_base_and_adapter

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
AXE = Path(__file__).parent / "node_modules" / "axe-core" / "axe.min.js"
ADMIN_TOKEN = "ui-admin-secret-for-tests"
HOSTILE_README = (
    "# Support bot\n\nTrained on **tickets**.\n\n"
    '<script>window.pwned = 1</script>\n\n<img src=x onerror="window.pwned = 2">\n\n'
    "[click](javascript:window.pwned=3)\n"
)
WAIT = 120.0


@dataclass(frozen=True)
class UiData:
    url: str
    base_ref: str
    v1_digest: str
    v2_digest: str
    base_digest: str
    export_digest: str
    export_job: str
    reader_token: str
    adapter_file_digest: str


SERVER_ENV = {
    "PEFTREG_ANONYMOUS": "none",
    "PEFTREG_ADMIN_TOKEN": ADMIN_TOKEN,
    # Heartbeats (a third of the lease) carry progress: often enough to watch the bar move.
    "PEFTREG_JOB_LEASE_SECONDS": "1.5",
    "PEFTREG_WORKER_POLL_SECONDS": "0.2",
    "PEFTREG_WORKER_THROTTLE_SECONDS": "0.1",
    # Jobs run only while a test starts a `peftreg worker` (RegistryProcess.worker): a job
    # stays queued until then, whatever the machine's load.
    "PEFTREG_EMBEDDED_WORKER": "false",
}


@pytest.fixture(scope="module")
def ui_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegistryProcess]:
    server = start_registry(tmp_path_factory.mktemp("ui") / "home", SERVER_ENV)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def admin_client(ui_server: RegistryProcess, tmp_path_factory: pytest.TempPathFactory) -> Client:
    cache = tmp_path_factory.mktemp("ui-cache")
    return Client(ui_server.url, token=ADMIN_TOKEN, cache=cache)


def sha256_file(path: Path) -> str:
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


def move_tag(client: Client, source: str, target: str) -> None:
    manifest = client.get_manifest(source)
    client.put_manifest(target, manifest.content, manifest.media_type)


def seed(server: RegistryProcess, client: Client, root: Path) -> UiData:
    """A base, adapters in two namespaces, a moved channel tag, a finished export, a reader."""
    pushed = push_base_and_adapter(client, root, repository="acme/bot")
    wider = lora_dir(pushed.model, root / "adapter-r8", seed=11, rank=8)
    (wider / "README.md").write_text(HOSTILE_README)
    base = client.base_reference(pushed.base_ref)
    client.push(wider, "acme/bot:v2", base=base)
    client.push(pushed.adapter_dir, "beta/secret:v1", base=base)
    move_tag(client, "acme/bot:v1", "acme/bot:prod")
    move_tag(client, "acme/bot:v2", "acme/bot:prod")
    job, _created = client.export("acme/bot:v1", pushed.base_ref, dtype="float16")
    with server.worker():
        done = client.wait_job(job.id, timeout=WAIT)
    assert done.result is not None
    reader = client.create_token("reader", [("acme/*", "read")])
    return UiData(
        url=server.url,
        base_ref=pushed.base_ref,
        v1_digest=str(client.resolve("acme/bot:v1")),
        v2_digest=str(client.resolve("acme/bot:v2")),
        base_digest=str(client.resolve(pushed.base_ref)),
        export_digest=str(done.result["digest"]),
        export_job=job.id,
        reader_token=reader.token,
        adapter_file_digest=sha256_file(pushed.adapter_dir / "adapter_model.safetensors"),
    )


@pytest.fixture(scope="module")
def ui_data(
    ui_server: RegistryProcess, admin_client: Client, tmp_path_factory: pytest.TempPathFactory
) -> UiData:
    return seed(ui_server, admin_client, tmp_path_factory.mktemp("ui-artifacts"))


@contextmanager
def chromium() -> Iterator[Browser]:
    """Debian's chromium, headless; Playwright's own browser downloads are never used."""
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield launched
        finally:
            launched.close()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with chromium() as launched:
        yield launched


@pytest.fixture
def context(browser: Browser) -> Iterator[BrowserContext]:
    # bypass_csp: only so the test can inject axe-core; the pages themselves allow 'self' only.
    created = browser.new_context(bypass_csp=True)
    created.set_default_timeout(30_000)
    yield created
    created.close()


@pytest.fixture
def page(context: BrowserContext) -> Page:
    return context.new_page()


@pytest.fixture(scope="module")
def axe_source() -> str:
    if not AXE.exists():
        raise RuntimeError(f"{AXE} is missing: run `npm ci --prefix tests/browser`")
    return AXE.read_text()


def login(page: Page, url: str, token: str) -> None:
    page.goto(f"{url}/ui/login")
    page.get_by_label("Token").fill(token)
    page.get_by_role("button", name="Log in").click()
    page.wait_for_url(f"{url}/ui/")


def serious_violations(page: Page, axe_source: str) -> list[dict[str, object]]:
    """axe-core's violations of impact serious or critical on the current page."""
    page.add_script_tag(content=axe_source)
    violations: list[dict[str, object]] = page.evaluate(
        """async () => {
            const result = await axe.run(document, {resultTypes: ["violations"]});
            return result.violations.map(v => ({
                id: v.id, impact: v.impact, help: v.help,
                targets: v.nodes.map(n => n.target.join(" ")).slice(0, 5),
            }));
        }"""
    )
    return [v for v in violations if v["impact"] in ("serious", "critical")]
