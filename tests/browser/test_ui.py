"""The web UI in a real headless Chromium against a real `peftreg serve`."""

from __future__ import annotations

import hashlib
import re

from playwright.sync_api import Page, expect

from peftreg.sdk.client import Client
from tests.browser.conftest import ADMIN_TOKEN, UiData, login, serious_violations
from tests.fixtures.server import RegistryProcess


def assert_accessible(page: Page, axe_source: str) -> None:
    violations = serious_violations(page, axe_source)
    assert violations == [], f"{page.url}: {violations}"


def test_anonymous_is_sent_to_login_and_a_wrong_token_is_refused(
    page: Page, ui_data: UiData, axe_source: str
) -> None:
    page.goto(f"{ui_data.url}/ui/r/acme/bot")
    expect(page).to_have_url(re.compile(r"/ui/login\?next=/ui/r/acme/bot$"))
    assert_accessible(page, axe_source)
    page.get_by_label("Token").fill("prt_nope_nope")
    page.get_by_role("button", name="Log in").click()
    expect(page.get_by_test_id("error")).to_contain_text("invalid token")
    cookie = next(c for c in page.context.cookies() if c["name"] == "peftreg_ui")
    assert cookie["httpOnly"]
    assert cookie["sameSite"] == "Strict"
    assert "prt_nope" not in page.url


def test_browse_filter_and_open_a_card(page: Page, ui_data: UiData, axe_source: str) -> None:
    login(page, ui_data.url, ADMIN_TOKEN)
    expect(page.get_by_role("heading", name="acme")).to_be_visible()
    expect(page.get_by_role("heading", name="beta")).to_be_visible()
    assert ADMIN_TOKEN not in page.content()
    assert_accessible(page, axe_source)

    page.get_by_role("link", name="acme/bot", exact=True).click()
    versions = page.get_by_test_id("versions")
    expect(versions.locator("tbody tr")).to_have_count(3)  # v1 (prod moved on), v2, the export
    page.get_by_label("Rank at most").fill("4")
    page.get_by_role("button", name="Filter").click()
    expect(page).to_have_url(re.compile(r"max_rank=4"))
    expect(versions.locator("tbody tr")).to_have_count(1)
    expect(versions).to_contain_text("v1")
    expect(versions).not_to_contain_text("v2")
    assert_accessible(page, axe_source)

    page.goto(f"{ui_data.url}/ui/versions")
    page.get_by_label("Kind").select_option("base")
    page.get_by_role("button", name="Filter").click()
    expect(versions.locator("tbody tr")).to_have_count(1)
    expect(versions).to_contain_text("acme/base")
    page.get_by_label("Kind").select_option("lora")
    page.get_by_label("Verified").select_option("yes")
    page.get_by_role("button", name="Filter").click()
    expect(versions.locator("tbody tr")).to_have_count(3)  # acme/bot v1, v2, beta/secret v1

    page.goto(f"{ui_data.url}/ui/r/acme/bot")
    page.get_by_role("link", name=ui_data.v1_digest.split(":")[1][:12]).click()
    expect(page.get_by_test_id("kind")).to_have_text("lora")
    expect(page.get_by_test_id("rank")).to_have_text("4")
    expect(page.get_by_test_id("base")).to_contain_text("verified")
    expect(page.get_by_test_id("targets").locator("tbody tr")).to_have_count(14)
    expect(page.get_by_test_id("targets")).to_contain_text("lora_A.weight (4, 32)")
    expect(page.get_by_test_id("tags")).to_contain_text("v1")
    expect(page.get_by_test_id("pull-snippet")).to_contain_text("peftreg pull acme/bot:v1")
    files = page.get_by_test_id("files")
    expect(files).to_contain_text(ui_data.adapter_file_digest)
    assert_accessible(page, axe_source)

    link = files.get_by_role("link", name="adapter_model.safetensors")
    response = page.request.get(ui_data.url + str(link.get_attribute("href")))
    assert response.status == 200
    assert "sha256:" + hashlib.sha256(response.body()).hexdigest() == ui_data.adapter_file_digest

    base_link = page.get_by_test_id("base").get_by_role("link", name="acme/base")
    base_link.click()
    expect(page.get_by_test_id("kind")).to_have_text("base")
    expect(page.get_by_test_id("digest")).to_have_text(ui_data.base_digest)


def test_a_model_card_is_rendered_without_its_markup(
    page: Page, ui_data: UiData, axe_source: str
) -> None:
    login(page, ui_data.url, ADMIN_TOKEN)
    page.goto(f"{ui_data.url}/ui/r/acme/bot/-/versions/v2")
    readme = page.get_by_test_id("readme")
    expect(readme.locator("strong")).to_have_text("tickets")
    expect(readme).to_contain_text("<script>window.pwned = 1</script>")
    assert readme.locator("script, img").count() == 0
    assert readme.locator("a[href^='javascript']").count() == 0
    assert page.evaluate("window.pwned") is None
    assert_accessible(page, axe_source)


def test_tags_channel_history_and_audit(page: Page, ui_data: UiData, axe_source: str) -> None:
    login(page, ui_data.url, ADMIN_TOKEN)
    page.goto(f"{ui_data.url}/ui/r/acme/bot/-/tags")
    table = page.get_by_test_id("tag-table")
    expect(table.get_by_role("row", name=re.compile(r"^v1 .*immutable"))).to_have_count(1)
    expect(table.get_by_role("row", name=re.compile(r"^prod .*channel"))).to_have_count(1)
    assert_accessible(page, axe_source)
    page.get_by_role("link", name="history of prod").click()
    rows = page.get_by_test_id("history").locator("tbody tr")
    expect(rows).to_have_count(2)
    v1, v2 = ui_data.v1_digest.split(":")[1][:12], ui_data.v2_digest.split(":")[1][:12]
    expect(rows.nth(0).locator("td")).to_have_text([re.compile(r"\d{4}-"), "admin", v1, v2])
    expect(rows.nth(1).locator("td")).to_have_text(
        [re.compile(r"\d{4}-"), "admin", "(created)", v1]
    )
    assert_accessible(page, axe_source)
    page.get_by_role("link", name="Audit log").click()
    audit = page.get_by_test_id("audit")
    expect(audit).to_contain_text("tag.move")
    expect(audit).to_contain_text("token.create")
    assert_accessible(page, axe_source)


def test_compare_two_versions(page: Page, ui_data: UiData, axe_source: str) -> None:
    login(page, ui_data.url, ADMIN_TOKEN)
    page.get_by_role("link", name="Compare").click()
    page.get_by_label("First").fill("acme/bot:v1")
    page.get_by_label("Second").fill("acme/bot:v2")
    page.get_by_role("button", name="Compare").click()
    comparison = page.get_by_test_id("comparison")
    expect(comparison.get_by_role("row", name=re.compile("^Rank"))).to_contain_text("4")
    expect(page.get_by_test_id("rank-b")).to_have_text("8")
    changes = page.get_by_test_id("changes").locator("tbody tr")
    expect(changes).to_have_count(28)
    expect(changes.first).to_contain_text("shape/dtype differs")
    assert_accessible(page, axe_source)


def test_lineage_picture(page: Page, ui_data: UiData, axe_source: str) -> None:
    login(page, ui_data.url, ADMIN_TOKEN)
    page.goto(f"{ui_data.url}/ui/r/acme/bot/-/versions/v1")
    page.get_by_role("link", name="Lineage picture").click()
    svg = page.get_by_test_id("lineage-svg")
    expect(svg.locator("g[data-kind='base']")).to_have_count(1)
    expect(svg.locator("g[data-kind='adapter']")).to_have_count(3)
    expect(svg.locator("g[data-kind='export']")).to_have_count(1)
    expect(svg.locator("g[data-kind='export']")).to_contain_text("merged · float16")
    expect(svg.locator("path.edge")).to_have_count(4)
    words = page.get_by_test_id("lineage-list")
    expect(words.get_by_role("link", name=ui_data.export_job)).to_be_visible()
    expect(words).to_contain_text('"dtype": "float16"')
    assert_accessible(page, axe_source)


def test_export_form_starts_gguf_and_refuses_gptq_without_calibration(
    page: Page, ui_data: UiData, admin_client: Client, axe_source: str
) -> None:
    login(page, ui_data.url, ADMIN_TOKEN)
    page.goto(f"{ui_data.url}/ui/r/acme/bot/-/versions/v1")
    form = page.get_by_test_id("export-form")
    form.get_by_label("Format").select_option("gguf")
    form.get_by_label("Quantize").select_option("q8_0")
    form.get_by_role("button", name="Start export").click()
    expect(page).to_have_url(re.compile(r"/ui/jobs/job_"))
    parameters = page.locator("code.small")
    expect(parameters).to_contain_text('"format": "gguf"')
    expect(parameters).to_contain_text('"quantize": "q8_0"')
    assert_accessible(page, axe_source)
    # Cancelled at once: no worker of a later test runs it.
    page.get_by_role("button", name="Cancel job").click()
    expect(page.get_by_test_id("job-status")).to_have_text("cancelled")

    page.goto(f"{ui_data.url}/ui/r/acme/bot/-/versions/v1")
    csrf = page.get_by_test_id("export-form").locator("input[name=csrf]").input_value()
    jobs_before = {job.id for job in admin_client.jobs()}
    refused = page.request.post(
        f"{ui_data.url}/ui/exports",
        form={
            "csrf": csrf,
            "adapter": "acme/bot:v1",
            "base": ui_data.base_ref,
            "quantize": "int4",
            "algorithm": "gptq",
        },
    )
    assert refused.status == 400
    assert "calibration" in refused.text()
    assert {job.id for job in admin_client.jobs()} == jobs_before, "a refused export made a job"


def test_follow_a_job_from_queued_to_done_and_cancel_another(
    page: Page,
    ui_data: UiData,
    ui_server: RegistryProcess,
    admin_client: Client,
    axe_source: str,
) -> None:
    login(page, ui_data.url, ADMIN_TOKEN)
    # No worker runs until the block below: both jobs stay queued, whatever the machine's load.
    page.goto(f"{ui_data.url}/ui/r/acme/bot/-/versions/v1")
    form = page.get_by_test_id("export-form")
    form.get_by_label("Output dtype").select_option("float32")
    form.get_by_role("button", name="Start export").click()
    expect(page).to_have_url(re.compile(r"/ui/jobs/job_"))
    followed = page.url
    expect(page.get_by_test_id("job-status")).to_have_text("queued")
    assert_accessible(page, axe_source)

    cancelled, created = admin_client.export("acme/bot:v2", ui_data.base_ref, dtype="bfloat16")
    assert created
    other = page.context.new_page()
    other.goto(f"{ui_data.url}/ui/jobs/{cancelled.id}")
    other.get_by_role("button", name="Cancel job").click()
    expect(other.get_by_test_id("job-status")).to_have_text("cancelled")
    expect(other.get_by_test_id("cancel-form")).to_have_count(0)

    # A worker starts: the followed job's bar moves through the middle, then it is done.
    with ui_server.worker():
        page.wait_for_function(
            "() => { const p = document.getElementById('job-progress');"
            " return p && p.value > 0 && p.value < 1; }",
            timeout=60_000,
        )
        expect(page.get_by_test_id("job-status")).to_have_text("running")
        expect(page.get_by_test_id("job-status")).to_have_text("succeeded", timeout=60_000)
    expect(page.get_by_test_id("job-result")).to_contain_text("acme/bot@")
    expect(page.get_by_test_id("job-log")).to_contain_text("succeeded")
    assert page.url == followed
    assert admin_client.job(cancelled.id).status == "cancelled"  # never run by the worker

    page.get_by_role("navigation", name="Main").get_by_role("link", name="Jobs").click()
    expect(page.get_by_test_id("jobs-cancelled")).to_contain_text(cancelled.id[:16])
    expect(page.get_by_test_id("jobs-succeeded")).to_contain_text(ui_data.export_job[:16])
    assert_accessible(page, axe_source)


def test_tokens_created_once_and_revoked(page: Page, ui_data: UiData, axe_source: str) -> None:
    login(page, ui_data.url, ADMIN_TOKEN)
    page.get_by_role("link", name="Tokens").click()
    page.get_by_label("Name").fill("ci-bot")
    page.get_by_label("Repositories (pattern)").fill("acme/*")
    page.get_by_label("Scope").select_option("write")
    page.get_by_role("button", name="Create").click()
    secret = page.get_by_test_id("issued-secret").input_value()
    assert secret.startswith("prt_")
    assert secret not in page.url
    assert_accessible(page, axe_source)
    page.goto(f"{ui_data.url}/ui/tokens")
    assert secret not in page.content()
    row = page.get_by_test_id("tokens").get_by_role("row", name=re.compile("^ci-bot"))
    expect(row).to_contain_text("active")
    row.get_by_role("button", name="Revoke ci-bot").click()
    expect(row).to_contain_text("revoked")


def test_a_read_only_token_sees_no_write_controls_and_gets_403_for_writes(
    page: Page, ui_data: UiData, ui_server: RegistryProcess, axe_source: str
) -> None:
    login(page, ui_data.url, ui_data.reader_token)
    expect(page.get_by_test_id("principal")).to_have_text("token:reader")
    expect(page.get_by_role("heading", name="acme")).to_be_visible()
    expect(page.get_by_role("heading", name="beta")).to_have_count(0)
    expect(page.get_by_role("link", name="Tokens")).to_have_count(0)
    expect(page.get_by_role("link", name="Audit log")).to_have_count(0)
    page.goto(f"{ui_data.url}/ui/versions")
    expect(page.get_by_test_id("versions")).not_to_contain_text("beta/secret")

    page.goto(f"{ui_data.url}/ui/r/acme/bot/-/versions/v1")
    expect(page.get_by_test_id("kind")).to_have_text("lora")
    expect(page.get_by_test_id("export-form")).to_have_count(0)
    page.goto(f"{ui_data.url}/ui/jobs/{ui_data.export_job}")
    expect(page.get_by_test_id("job-status")).to_have_text("succeeded")
    expect(page.get_by_test_id("cancel-form")).to_have_count(0)
    assert_accessible(page, axe_source)
    csrf = page.locator("input[name=csrf]").first.input_value()

    response = page.goto(f"{ui_data.url}/ui/r/beta/secret")
    assert response is not None
    assert response.status == 403
    response = page.goto(f"{ui_data.url}/ui/tokens")
    assert response is not None
    assert response.status == 403
    posts = {
        "/ui/exports": {"csrf": csrf, "adapter": "acme/bot:v1", "base": ui_data.base_ref},
        f"/ui/jobs/{ui_data.export_job}/cancel": {"csrf": csrf},
        "/ui/tokens": {"csrf": csrf, "name": "sneaky", "pattern": "*", "scope": "admin"},
    }
    for path, form in posts.items():
        answer = page.request.post(ui_data.url + path, form=form)
        assert answer.status == 403, (path, answer.status)
    forged = page.request.post(ui_data.url + "/ui/logout", form={"csrf": "forged"})
    assert forged.status == 403
    assert ui_data.reader_token not in ui_server.log_path.read_text(errors="replace")
