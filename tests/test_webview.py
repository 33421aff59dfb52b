"""The web view in a real headless browser (Playwright driving Debian's chromium) against a real
server: invoke from the form, watch the execution complete live in the list, open it, cancel a
running one; filters and paging; a server with tokens. Screenshots go to tests/artifacts/.

Without chromium or Playwright these tests are skipped, and say why in the summary (`make test`
installs chromium where it can, and `.ci/run` always does).
"""

from __future__ import annotations

import json
import re
import shutil
import warnings
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio

from spear.cli import components
from spear.core.config import with_overrides
from spear.core.tokens import hash_token, new_token
from tests.conftest import invoke_body, start_spear
from tests.processes import free_port

pytestmark = pytest.mark.slow

ARTIFACTS = Path(__file__).parent / "artifacts"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
WAIT_MS = 15_000


def _missing() -> str:
    try:
        import playwright.async_api  # noqa: F401
    except ImportError:
        return "Playwright is not installed (pip install -e '.[test]')"
    if CHROMIUM is None:
        return "chromium is not installed (apt-get install -y chromium; `make test` does it as root)"
    return ""


@pytest_asyncio.fixture(scope="module")
async def browser() -> AsyncIterator[Any]:
    missing = _missing()
    if missing:
        warnings.warn(f"BROWSER TESTS SKIPPED: {missing}", pytest.PytestWarning, stacklevel=1)
        pytest.skip(f"browser tests skipped: {missing}")
    from playwright.async_api import async_playwright, expect

    expect.set_options(timeout=WAIT_MS)
    async with async_playwright() as playwright:
        chromium = await playwright.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield chromium
        await chromium.close()


@pytest_asyncio.fixture
async def page(browser, request) -> AsyncIterator[Any]:
    """A fresh page that records every browser-side error; the test fails on any."""
    context = await browser.new_context(viewport={"width": 1280, "height": 860})
    page = await context.new_page()
    page.set_default_timeout(WAIT_MS)
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(f"page error: {error}"))
    page.on("console", lambda msg: errors.append(f"console: {msg.text}") if msg.type == "error" else None)
    page.errors = errors
    yield page
    ARTIFACTS.mkdir(exist_ok=True)
    await page.screenshot(path=str(ARTIFACTS / f"{request.node.name}-last.png"), full_page=True)
    await context.close()


async def _serve(stack: AsyncExitStack, service) -> str:
    port = free_port()
    await components.start_http(stack, service, port, host="127.0.0.1")
    return f"http://127.0.0.1:{port}"


@pytest_asyncio.fixture
async def base_url(spear) -> AsyncIterator[str]:
    async with AsyncExitStack() as stack:
        yield await _serve(stack, spear.service)


async def _shot(page, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    await page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


async def _invoke_from_the_form(page, base_url: str, function: str, **values: object) -> str:
    await page.goto(f"{base_url}/#/tasks")
    await page.click(f"[data-invoke={function}]")
    form = page.locator(f"form[data-function={function}]")
    for name, value in values.items():
        await form.locator(f"input[name={name}]").fill(json.dumps(value))
    await _shot(page, f"invoke-form-{function}")
    await form.locator("button[type=submit]").click()
    await page.wait_for_url(re.compile(r"#/executions\?new="))
    return page.url.rsplit("new=", 1)[1]


async def test_invoke_from_the_form_watch_it_live_open_it_and_cancel_a_running_one(spear, base_url, page):
    from playwright.async_api import expect

    # invoke from the form: the list shows it at once and it completes there, live
    asked: list[str] = []
    page.on("request", lambda request: asked.append(request.url))
    execution_id = await _invoke_from_the_form(page, base_url, "sleep", ms=1500)
    row = page.locator(f"#executions tr[data-id='{execution_id}']")
    await expect(row).to_have_attribute("data-status", re.compile("PENDING|RUNNING"))
    await _shot(page, "list-running")
    await expect(row).to_have_attribute("data-status", "COMPLETED")
    await expect(page.locator("#live")).to_have_class(re.compile(r"\bok\b"))
    await _shot(page, "list-completed")
    # the list polls its page: it follows no feed of every event (under load, one is a flood)
    assert sum("/api/v1/executions?" in url for url in asked) >= 2
    assert not [url for url in asked if "/api/v1/events" in url]

    # open it: summary, parameters, result and the event timeline
    await row.click()
    await page.wait_for_url(f"**/#/executions/{execution_id}")
    await expect(page.locator("#result")).to_have_text("1500")
    await expect(page.locator("#parameters")).to_contain_text('"ms": 1500')
    kinds = page.locator("#timeline li")
    await expect(kinds).to_have_count(3)
    assert [await li.get_attribute("data-kind") for li in await kinds.all()] == ["requested", "started", "completed"]
    await expect(page.locator("#cancel")).to_be_hidden()
    await _shot(page, "execution-completed")

    # a running one: progress live on its page, then cancelled from the button
    running_id = await _invoke_from_the_form(page, base_url, "process", dataset="sales", steps=100, step_ms=200)
    await page.locator(f"#executions tr[data-id='{running_id}']").click()
    await expect(page.locator("[data-status=RUNNING]")).to_be_visible()
    await expect(page.locator("#timeline li[data-kind=log]")).to_have_count(1)  # progress reports share a row
    await expect(page.locator(".progress-label")).to_contain_text("step")
    await _shot(page, "execution-running")
    await page.click("#cancel")
    await expect(page.locator("[data-status=CANCELLED]")).to_be_visible()
    await expect(page.locator("#error")).to_contain_text("CANCELLED")
    await expect(page.locator("#timeline li").last).to_have_attribute("data-kind", "cancelled")
    await expect(page.locator("#cancel")).to_be_hidden()
    await _shot(page, "execution-cancelled")
    state = await spear.service.execution_state(running_id)
    assert state is not None and state.status == "EXECUTION_STATUS_CANCELLED"
    assert state.result is not None and state.result.execution_time_ms > 0

    # the workers page names the worker and its task
    await page.goto(f"{base_url}/#/workers")
    worker = page.locator(f"#workers tr[data-worker='{spear.worker.worker_id}']")
    await expect(worker).to_contain_text("demo")
    await _shot(page, "workers")
    await page.goto(f"{base_url}/#/tasks")
    await expect(page.locator("[data-task=demo]")).to_contain_text("calculate_fibonacci")
    await _shot(page, "tasks")
    assert page.errors == []


async def test_a_stream_function_from_the_form_shows_its_chunks(spear, base_url, page):
    from playwright.async_api import expect

    execution_id = await _invoke_from_the_form(page, base_url, "generate_text", prompt="to be or not", tokens=4)
    row = page.locator(f"#executions tr[data-id='{execution_id}']")
    await expect(row).to_have_attribute("data-status", "COMPLETED")
    await row.click()
    chunks = page.locator("#timeline li[data-kind=chunk]")
    await expect(chunks).to_have_count(4)
    await expect(chunks.first).to_contain_text("chunk 0: to")
    await expect(page.locator("#summary-mode")).to_have_text("stream")
    await _shot(page, "execution-stream")
    assert page.errors == []


async def test_a_value_typed_for_a_text_parameter_is_sent_as_text(spear, base_url, page):
    """review53: `42` typed for `email: str` was sent as the number 42, which the worker refuses."""
    from playwright.async_api import expect

    execution_id = await _invoke_from_the_form(page, base_url, "validate_email", email=42)
    row = page.locator(f"#executions tr[data-id='{execution_id}']")
    await expect(row).to_have_attribute("data-status", "COMPLETED")
    state = await spear.service.execution_state(execution_id)
    assert state is not None and state.result is not None and state.result.result == {"email": "42", "valid": False}
    assert page.errors == []


async def test_filters_and_paging_of_the_list(spear, base_url, page):
    from playwright.async_api import expect

    async with aiohttp.ClientSession(base_url) as http:
        for n in range(26):  # one more than a page
            async with http.post("/api/v1/invoke", json=invoke_body("calculate_fibonacci", n=n)) as response:
                assert response.status == 200
        async with http.post("/api/v1/invoke", json=invoke_body("fail", message="disk full")) as response:
            failed_id = (await response.json())["execution_id"]
    await spear.caught_up()

    await page.goto(f"{base_url}/#/executions")
    rows = page.locator("#executions tbody tr")
    await expect(rows).to_have_count(25)
    await expect(rows.first).to_have_attribute("data-id", failed_id)  # newest first
    first_page = [await row.get_attribute("data-id") for row in await rows.all()]
    await page.click("#page-older")
    await expect(rows).to_have_count(2)
    older = [await row.get_attribute("data-id") for row in await rows.all()]
    assert set(older).isdisjoint(first_page) and older == sorted(older, reverse=True)
    await page.click("#page-newer")
    await expect(rows).to_have_count(25)

    await page.select_option("#filter-status", "FAILED")
    await expect(rows).to_have_count(1)
    await expect(rows.first).to_have_attribute("data-id", failed_id)
    await page.select_option("#filter-status", "")
    await page.select_option("#filter-task", "demo")
    await page.select_option("#filter-function", "fail")
    await expect(rows).to_have_count(1)
    await _shot(page, "list-filtered")
    assert "function=fail" in page.url and page.errors == []
    await page.click("#clear-filters")
    await expect(rows).to_have_count(25)

    await page.goto(f"{base_url}/#/executions/never-was")  # an unknown id says so, and stops asking
    await expect(page.locator(".notice.err")).to_contain_text("no execution with id 'never-was'")
    await expect(page.locator("#live")).to_be_hidden()


async def _guarded(stack: AsyncExitStack, settings, browser) -> tuple[Any, str, str]:
    """A server whose HTTP API wants a token, and a page of a fresh browser context: (the page,
    the server's base URL, a token with the read and invoke roles)."""
    token = new_token()
    guarded = with_overrides(settings, api={"tokens": [hash_token("ops", ["read", "invoke"], token).line()]})
    spear = await start_spear(stack, guarded)
    base_url = await _serve(stack, spear.service)
    context = await browser.new_context()
    stack.push_async_callback(context.close)
    page = await context.new_page()
    page.set_default_timeout(WAIT_MS)
    return page, base_url, token


async def test_a_server_with_tokens_asks_for_one_and_then_works(settings, browser):
    async with AsyncExitStack() as stack:
        page, base_url, token = await _guarded(stack, settings, browser)
        from playwright.async_api import expect

        await page.goto(f"{base_url}/#/executions")
        await expect(page.locator("#token-bar")).to_be_visible()
        await page.fill("#token-input", token)
        await page.click("#token-form button")
        await expect(page.locator("#token-bar")).to_be_hidden()
        execution_id = await _invoke_from_the_form(page, base_url, "echo", value={"a": 1})
        row = page.locator(f"#executions tr[data-id='{execution_id}']")
        await expect(row).to_have_attribute("data-status", "COMPLETED")  # the live feed works with a token too
        await _shot(page, "with-token")


async def test_an_open_execution_page_follows_again_after_the_server_restarts(spear, page):
    """The server ends its event streams when it stops: a page whose execution had not ended
    then followed nothing more, showing it running for good. It reconnects and catches up."""
    from playwright.async_api import expect

    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    accepted, _ = await spear.call(spear.nc, "invoke_function", invoke_body("sleep", "ASYNC", ms=2500))
    execution_id = accepted["execution_id"]
    async with AsyncExitStack() as first:
        await components.start_http(first, spear.service, port, host="127.0.0.1")
        await page.goto(f"{base_url}/#/executions/{execution_id}")
        await expect(page.locator("[data-status=RUNNING]")).to_be_visible()
    async with AsyncExitStack() as second:  # the same address, as after a restart
        await components.start_http(second, spear.service, port, host="127.0.0.1")
        await expect(page.locator("[data-status=COMPLETED]")).to_be_visible()
        await expect(page.locator("#timeline li").last).to_have_attribute("data-kind", "completed")
    assert [e for e in page.errors if "ERR_CONNECTION_REFUSED" not in e and "Failed to fetch" not in e] == []


async def test_a_refused_request_shows_the_servers_message_not_a_script_error(spear, base_url, page):
    from playwright.async_api import expect

    await page.goto(f"{base_url}/#/executions?status=bogus")
    await expect(page.locator("#executions")).to_contain_text("Could not list executions: status 'bogus' is not one of")
    assert "Cannot read properties" not in await page.locator("body").inner_text()
    assert [e for e in page.errors if "400" not in e] == []  # the browser logs the 400 itself


async def test_an_open_list_says_when_the_server_is_gone_and_lists_again_when_it_is_back(spear, page):
    from playwright.async_api import expect

    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    async with AsyncExitStack() as first:
        await components.start_http(first, spear.service, port, host="127.0.0.1")
        await page.goto(f"{base_url}/#/executions")
        await expect(page.locator("#live")).to_have_class(re.compile(r"\bok\b"))
    await expect(page.locator("#live")).to_have_class(re.compile(r"\bwarn\b"))
    await expect(page.locator("#live")).to_have_text(re.compile("reconnecting"))
    accepted, _ = await spear.call(spear.nc, "invoke_function", invoke_body("echo", "ASYNC", value=1))
    async with AsyncExitStack() as second:  # the same address, as after a restart
        await components.start_http(second, spear.service, port, host="127.0.0.1")
        row = page.locator(f"#executions tr[data-id='{accepted['execution_id']}']")
        await expect(row).to_have_attribute("data-status", "COMPLETED")
        await expect(page.locator("#live")).to_have_class(re.compile(r"\bok\b"))
    assert [e for e in page.errors if "ERR_CONNECTION_REFUSED" not in e and "Failed to fetch" not in e] == []


async def test_a_list_left_before_its_first_listing_came_shows_nothing_on_the_next_page(spear, base_url, page):
    """The executions page's first listing may come after the user has moved on: it then neither
    shows its `live` pill on the next page nor lists again (a review saw the pill on Tasks)."""
    import asyncio

    from playwright.async_api import expect

    listed: list[str] = []

    async def slowly(route) -> None:
        listed.append(route.request.url)
        await asyncio.sleep(1.0)
        await route.continue_()

    await page.route("**/api/v1/executions?*", slowly)
    await page.goto(f"{base_url}/#/executions")
    await page.evaluate("location.hash = '#/tasks'")
    await expect(page.locator("[data-invoke=echo]")).to_be_visible()
    await asyncio.sleep(2.5)  # the slow listing came in, and a poll would have followed
    await expect(page.locator("#live")).to_be_hidden()
    assert len(listed) == 1, listed


async def test_a_page_left_while_its_data_came_does_not_draw_over_the_next(spear, base_url, page):
    """probe34: Tasks, then Workers 100 ms later, with the tasks listing slow: the Tasks page was
    drawn over the Workers page the address bar and the nav named, and stayed there."""
    import asyncio

    from playwright.async_api import expect

    async def slowly(route) -> None:
        await asyncio.sleep(0.6)
        await route.continue_()

    await page.goto(f"{base_url}/#/workers")
    await expect(page.locator("#workers")).to_be_visible()
    await page.route("**/api/v1/tasks?*", slowly)
    await page.evaluate("location.hash = '#/tasks'")
    await asyncio.sleep(0.1)
    await page.evaluate("location.hash = '#/workers'")
    await asyncio.sleep(1.2)  # the tasks listing came in meanwhile
    await expect(page.locator("#app h1")).to_have_text("Workers")
    await expect(page.locator("[data-task]")).to_have_count(0)
    assert page.errors == []


async def test_what_could_mislead_is_shown_as_it_is(served, page):
    """probe34: an integer past 2^53 was rounded; a bidirectional override in an error read
    backwards ("invoice_\u202efdp.exe" as "invoice_exe.pdf"); a retried attempt's progress stayed
    hidden behind the first one's 90%; a 128-character id pushed every row's columns off screen."""
    from playwright.async_api import expect

    async with AsyncExitStack() as stack:
        base_url = await _serve(stack, served.service)
        reply, _ = await served.call(served.nc, "invoke_function", invoke_body("echo", value={"id": 2**53 + 1}))
        await page.goto(f"{base_url}/#/executions/{reply['execution_id']}")
        await expect(page.locator("#result")).to_contain_text(str(2**53 + 1))  # (it read ...992)
        await expect(page.locator("#parameters")).to_contain_text(str(2**53 + 1))

        reply, _ = await served.call(served.nc, "invoke_function", invoke_body("fail", message="invoice_\u202efdp.exe"))
        await page.goto(f"{base_url}/#/executions/{reply['execution_id']}")
        await expect(page.locator("#error")).to_contain_text("invoice_\u27e8U+202E\u27e9fdp.exe")
        await expect(page.locator("#parameters")).to_contain_text("invoice_\u27e8U+202E\u27e9fdp.exe")  # (review31)

        body = {**invoke_body("progress_then_retry", "ASYNC"), "task_id": "own", "execution_id": "r" * 128}
        reply, _ = await served.call(served.nc, "invoke_function", body)
        await page.goto(f"{base_url}/#/executions/{'r' * 128}")
        await expect(page.locator(".progress-label")).to_contain_text("attempt 2 begins")
        await expect(page.locator(".progress-label")).to_contain_text("20%")

        await page.goto(f"{base_url}/#/executions")
        await expect(page.locator(f"#executions tr[data-id='{'r' * 128}']")).to_be_visible()
        widths = await page.evaluate(
            "[document.querySelector('#executions').scrollWidth, document.querySelector('.table-wrap').clientWidth]"
        )
        assert widths[0] <= widths[1], widths  # every column within the page
        await _shot(page, "long-id")
    assert page.errors == []


async def test_a_token_a_header_cannot_carry_is_refused_when_pasted_and_dropped_when_found(settings, browser):
    """probe34: a pasted token with a character outside Latin-1 was kept; every request then failed
    before it was sent, the token bar never came back, and health said "unreachable"."""
    from playwright.async_api import expect

    async with AsyncExitStack() as stack:
        page, base_url, token = await _guarded(stack, settings, browser)
        await page.goto(f"{base_url}/#/executions")
        await expect(page.locator("#token-bar")).to_be_visible()
        await page.fill("#token-input", token + "…")
        await page.click("#token-form button")
        await expect(page.locator("#token-bar")).to_be_visible()  # refused, said at the field
        assert await page.evaluate("localStorage.getItem('spear.token')") is None
        # one stored before (an older page): dropped, and the bar asks again
        await page.evaluate(f"localStorage.setItem('spear.token', {json.dumps(token + '…')})")
        await page.reload()
        await expect(page.locator("#token-bar")).to_be_visible()
        await page.fill("#token-input", token)
        await page.click("#token-form button")
        await expect(page.locator("#token-bar")).to_be_hidden()
        await expect(page.locator("#health .label")).to_have_text("healthy")
