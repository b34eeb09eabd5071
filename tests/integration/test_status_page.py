"""The status page at `/`, loaded in headless Chromium (Debian's `chromium`, driven by
playwright without its browser download): the node and block counts it renders are the
API's, live updates arrive, and with credentials it asks for the viewer token once and
keeps it in a cookie. Screenshots go to the test's tmp dir and to artifacts/."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path
from typing import Iterator

import pytest

from kvpool.launcher import stop
from tests.integration.conftest import ROOT, admin
from tests.integration.test_ops import NS_A, Up, put_chain, start_up

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
playwright_api = pytest.importorskip("playwright.async_api", reason="needs playwright (the test extra)")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium "
                                "(apt-get install chromium; make test does, as root)")
ARTIFACTS = ROOT / "artifacts"
VIEWER = "viewer-token-for-the-page-test"


@pytest.fixture
def open_pool(tmp_path: Path) -> Iterator[Up]:
    pool = start_up(tmp_path)
    try:
        yield pool
    finally:
        stop(pool.proc)


def save(shot: bytes, tmp: Path, name: str) -> None:
    (tmp / name).write_bytes(shot)
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / name).write_bytes(shot)


async def browser_page(pw):  # type: ignore[no-untyped-def]
    browser = await pw.chromium.launch(executable_path=CHROMIUM, headless=True,
                                       args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
    page = await browser.new_page(viewport={"width": 1280, "height": 900})
    return browser, page


async def until(read, ok, timeout: float = 10.0):  # type: ignore[no-untyped-def]
    """Poll the page from here (its CSP forbids the string functions playwright would inject)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not ok(value := await read()):
        assert asyncio.get_running_loop().time() < deadline, f"the page still shows {value!r}"
        await asyncio.sleep(0.1)
    return value


async def rendered_counts(page) -> tuple[str, str]:  # type: ignore[no-untyped-def]
    return (await page.text_content("[data-testid=nodes-count]"),
            await page.text_content("[data-testid=blocks-count]"))


async def test_the_page_shows_what_the_api_reports_and_follows_events(open_pool: Up, tmp_path: Path) -> None:
    await put_chain(open_pool, NS_A, 5, tag=1)
    async with playwright_api.async_playwright() as pw:
        browser, page = await browser_page(pw)
        try:
            await page.goto(open_pool.master + "/")
            await page.wait_for_selector("body[data-loaded='1']", timeout=20_000)
            cluster = admin(open_pool.master, "/v1/cluster")[1]
            assert await rendered_counts(page) == (str(cluster["nodes"]), str(cluster["blocks"]))
            assert cluster["blocks"] == 5
            nodes = admin(open_pool.master, "/v1/nodes")[1]["nodes"]
            for tier in nodes[0]["tiers"]:
                row = page.locator(f"#nodes tr[data-node='node0'][data-tier='{tier['kind']}']")
                assert await row.locator("[data-testid=tier-blocks]").text_content() == str(tier["blocks"])
            # The event list shows the put (its chain is one event), then follows the
            # stream as more blocks arrive.
            stored = page.locator("#events tr.BlockStored")
            assert await stored.count() >= 1
            assert "(5 blocks)" in (await stored.first.text_content() or "")
            more = await put_chain(open_pool, NS_A, 4, tag=2)
            await until(lambda: stored.count(), lambda n: n >= 2)
            first_row = await page.locator("#events tbody tr").first.text_content() or ""
            assert more[0].hex()[:12] in first_row and more[-1].hex()[:12] in first_row
            assert "(4 blocks)" in first_row
            await until(lambda: rendered_counts(page), lambda counts: counts == ("1", "9"))
            save(await page.screenshot(full_page=True), tmp_path, "status-page.png")
        finally:
            await browser.close()


@pytest.fixture
def secure_pool(tmp_path: Path) -> Iterator[Up]:
    pool = start_up(tmp_path, {"KVPOOL_MASTER_VIEWER_TOKEN": VIEWER,
                               "KVPOOL_MASTER_ADMIN_TOKEN": "admin-token-for-the-page-test",
                               "KVPOOL_MASTER_CLIENT_TOKENS": "client-token-for-the-page-test",
                               "KVPOOL_MASTER_CLUSTER_TOKEN": "cluster-token-for-the-page-test"})
    try:
        yield pool
    finally:
        stop(pool.proc)


async def test_with_credentials_the_page_asks_once_and_keeps_the_viewer_token(
        secure_pool: Up, tmp_path: Path) -> None:
    async with playwright_api.async_playwright() as pw:
        browser, page = await browser_page(pw)
        try:
            await page.goto(secure_pool.master + "/")
            await page.wait_for_selector("#login", state="visible", timeout=20_000)
            assert await rendered_counts(page) == ("–", "–")
            await page.fill("#token", VIEWER)
            await page.click("#login button")
            await page.wait_for_selector("body[data-loaded='1']", timeout=20_000)
            assert await rendered_counts(page) == ("1", "0")
            cookies = await page.context.cookies()
            assert any(c["name"] == "kvpool_token" and c["value"] == VIEWER for c in cookies)
            await page.reload()  # the cookie, not another prompt, carries the next visit
            await page.wait_for_selector("body[data-loaded='1']", timeout=20_000)
            assert not await page.is_visible("#login")
            save(await page.screenshot(full_page=True), tmp_path, "status-page-secure.png")
        finally:
            await browser.close()
