"""Secrets in `context.headers` / `context.environment` never come back out of a read path (events
JSON, SSE replay, status, lists), while the stored event keeps them for the worker."""

from contextlib import AsyncExitStack

import aiohttp
import pytest_asyncio

from spear.cli import components
from spear.core import contract
from spear.core.config import DEFAULT_REDACT_KEYS
from spear.core.enums import ExecutionMode
from spear.core.events import Requested
from spear.core.redact import REDACTED, Redactor
from tests.conftest import invoke_body
from tests.processes import free_port

SECRETS = {"Bearer abc.def.ghi", "hunter2", "sess=42", "tok-123", "s3cr3t"}
HEADERS = {"Authorization": "Bearer abc.def.ghi", "Cookie": "sess=42", "X-Request-Id": "r-1"}
ENVIRONMENT = {"DB_PASSWORD": "hunter2", "api_token": "tok-123", "AWS_SECRET_ACCESS_KEY": "s3cr3t", "REGION": "eu"}


@pytest_asyncio.fixture
async def http(spear):
    port = free_port()
    async with AsyncExitStack() as stack:
        await components.start_http(stack, spear.service, port)
        async with aiohttp.ClientSession(f"http://127.0.0.1:{port}") as session:
            yield session


def test_default_patterns_match_case_insensitively():
    redactor = Redactor(DEFAULT_REDACT_KEYS)
    assert redactor.values({**HEADERS, **ENVIRONMENT}) == {
        "Authorization": REDACTED,
        "Cookie": REDACTED,
        "X-Request-Id": "r-1",
        "DB_PASSWORD": REDACTED,
        "api_token": REDACTED,
        "AWS_SECRET_ACCESS_KEY": REDACTED,
        "REGION": "eu",
    }
    assert Redactor(["x-*"]).values(HEADERS)["X-Request-Id"] == REDACTED


def test_the_defaults_hide_the_common_credentials_and_a_urls_password_in_any_value():
    """probe34: these were shown in clear to any `read` token by the defaults."""
    redactor = Redactor(DEFAULT_REDACT_KEYS)
    hidden = {
        "Proxy-Authorization": "Basic YTpi",
        "X-Api-Key": "k-1",
        "Api-Key": "k-2",
        "Set-Cookie": "sid=1",
        "OPENAI_API_KEY": "sk-1",
        "STRIPE_KEY": "sk_live_1",
        "PRIVATE_KEY": "-----BEGIN",
        "DB_PASS": "hunter2",
        "GOOGLE_APPLICATION_CREDENTIALS": "/k.json",
    }
    shown = {"REGION": "eu", "X-Request-Id": "r-1", "HOME_URL": "https://example.com/a@b"}
    values = redactor.values({**hidden, **shown, "DATABASE_URL": "postgres://app:hunter2@db:5432/app?x=1"})
    assert {key: values[key] for key in hidden} == dict.fromkeys(hidden, REDACTED)
    assert {key: values[key] for key in shown} == shown
    assert values["DATABASE_URL"] == f"postgres://app:{REDACTED}@db:5432/app?x=1"


async def test_no_read_path_returns_a_secret_and_the_log_keeps_them(spear, http, client):
    body = invoke_body("echo", value="hi")
    body["context"] = {"headers": HEADERS, "environment": ENVIRONMENT}
    async with http.post("/api/v1/invoke", json=body) as response:
        assert response.status == 200
        execution = (await response.json())["execution_id"]
    await spear.caught_up()

    reads = [
        f"/api/v1/executions/{execution}/events",
        f"/api/v1/execution/{execution}/status?include_logs=true",
        "/api/v1/executions",
        "/api/v1/tasks/demo?include_executions=true",
    ]
    for path in reads:
        async with http.get(path) as response:
            text = await response.text()
        assert response.status == 200, path
        assert not [s for s in SECRETS if s in text], path
    async with http.get(reads[0]) as response:
        requested = (await response.json())[0]
    assert requested["context"]["headers"] == {"Authorization": REDACTED, "Cookie": REDACTED, "X-Request-Id": "r-1"}
    assert requested["context"]["environment"]["REGION"] == "eu"

    async with http.get(reads[0], headers={"Accept": "text/event-stream"}) as response:
        stream = await response.text()  # the replay ends after the terminal event
    assert "event: completed" in stream and REDACTED in stream
    assert not [s for s in SECRETS if s in stream]

    feed = ""  # the live feed of every execution, replayed from the start of the stream
    async with http.get("/api/v1/events", headers={"Accept": "text/event-stream", "Last-Event-ID": "0"}) as response:
        assert response.status == 200
        async for line in response.content:
            feed += line.decode()
            if "event: completed" in feed:
                break
    assert REDACTED in feed and not [s for s in SECRETS if s in feed]

    for operation in ("get_execution_status", "list_executions"):
        reply, _ = await spear.call(client, operation, {"execution_id": execution} if "status" in operation else {})
        assert not [s for s in SECRETS if s in str(reply)], operation

    stored = (await spear.service.store.history(execution))[0].event
    assert isinstance(stored, Requested)  # what the worker reads: the real values
    assert stored.context.headers == HEADERS and stored.context.environment == ENVIRONMENT


def test_no_patterns_redacts_nothing():
    event = Requested(
        execution_id="e",
        task_id="t",
        function_name="f",
        at="",
        execution_mode=ExecutionMode.SYNC,
        context=contract.ExecutionContext(headers=HEADERS),
    )
    assert Redactor([]).event(event) is event
    assert Redactor(DEFAULT_REDACT_KEYS).event(event).context.headers["Authorization"] == REDACTED
    assert event.context.headers["Authorization"] == HEADERS["Authorization"]  # the original is untouched
