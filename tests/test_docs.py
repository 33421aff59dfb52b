"""The docs in the repository stay true: docs/contract.md names exactly the HTTP routes and NATS
endpoints spear serves (read from a running app's router and the gateway's `$SRV.INFO`), and
every relative link in README.md and docs/*.md resolves, anchors included; the getting-started
guide's task and client run as written."""

from __future__ import annotations

import asyncio
import json
import os
import re
import sys
from contextlib import AsyncExitStack
from pathlib import Path

import pytest

from spear.api.http import create_app
from spear.cli import components

ROOT = Path(__file__).parent.parent
CONTRACT = ROOT / "docs" / "contract.md"
GUIDE = ROOT / "docs" / "getting-started.md"
METHODS = "GET|POST|PUT|PATCH|DELETE"
ROUTE = re.compile(rf"`((?:{METHODS})(?:/(?:{METHODS}))*) (/[^`\s]*)`")
SUBJECT = re.compile(r"`P\.api\.(\w+)`")
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")


def _named(text: str) -> tuple[set[tuple[str, str]], set[str]]:
    routes = {(method, path) for methods, path in ROUTE.findall(text) for method in methods.split("/")}
    return routes, set(SUBJECT.findall(text))


def _contract() -> tuple[set[tuple[str, str]], set[str], set[tuple[str, str]], set[str]]:
    """(routes, operations) the contract names as served, and those it lists as not served yet."""
    text = CONTRACT.read_text()
    served_text, _, later_text = text.partition("\n## Not served yet")
    later_routes, later_operations = _named(later_text)
    routes, operations = _named(served_text)
    return routes - later_routes, operations - later_operations, later_routes, later_operations


async def test_the_contract_names_every_route_and_subject_served_and_only_those(spear, client):
    routes, operations, later_routes, later_operations = _contract()
    assert routes and operations

    app = create_app(spear.service)
    served_routes = {
        (route.method, route.resource.canonical)
        for route in app.router.routes()
        if route.method != "HEAD" and not route.resource.canonical.startswith("/web/")  # the view's own files
    }
    info = json.loads((await client.request(f"$SRV.INFO.{spear.names.service_name}", b"", timeout=2)).data)
    prefix = f"{spear.names.prefix}.api."
    served_operations = {endpoint["subject"].removeprefix(prefix) for endpoint in info["endpoints"]}

    assert routes - served_routes == set(), "docs/contract.md names routes spear does not serve"
    assert served_routes - routes == set(), "spear serves routes docs/contract.md does not name"
    assert operations - served_operations == set(), "docs/contract.md names NATS endpoints spear does not serve"
    assert served_operations - operations == set(), "spear serves NATS endpoints docs/contract.md does not name"
    assert later_routes & served_routes == set(), "served now: move it out of 'Not served yet'"
    assert later_operations & served_operations == set(), "served now: move it out of 'Not served yet'"


def _anchors(markdown: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    anchors = set()
    for heading in re.findall(r"^#{1,6} +(.+?) *$", markdown, flags=re.M):
        text = re.sub(r"[^\w\- ]", "", heading.replace("`", "").lower())
        anchors.add(text.replace(" ", "-"))
    return anchors


def test_every_relative_link_in_the_readme_and_docs_resolves():
    documents = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    checked = 0
    for document in documents:
        text = document.read_text()
        assert "shared/CONTRACT.md" not in text, f"{document.name} points outside the repository"
        for target in LINK.findall(text):
            if re.match(r"^[a-z]+:", target):
                continue  # an absolute URL
            path, _, anchor = target.partition("#")
            resolved = (document.parent / path).resolve() if path else document
            assert resolved.is_file() and ROOT in resolved.parents, f"{document.name}: {target} does not resolve"
            if anchor and resolved.suffix == ".md":
                assert anchor in _anchors(resolved.read_text()), f"{document.name}: no heading for {target}"
            checked += 1
    assert checked >= 10  # the docs do link to each other


def test_every_curl_that_sends_a_body_says_it_is_json():
    """The HTTP API takes JSON bodies only (a form post is refused: no cross-site requests), and
    curl's `-d` alone says the body is a form."""
    documents = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    commands = [
        (document.name, command)
        for document in documents
        for command in re.split(r"(?<!\\)\n", document.read_text())  # a command, continued lines joined
        if re.search(r"\bcurl\b.*\s(-d|--data)\b", command, flags=re.S)
    ]
    assert len(commands) >= 3  # the README's invocations and its registration
    for name, command in commands:
        assert "Content-Type: application/json" in command, f"{name}: {command}"


@pytest.mark.slow
async def test_the_getting_started_task_and_client_run_as_written(spear, tmp_path):
    """Step 4's task served by a worker, and step 5's client script run against it."""
    task_code, client_code = re.findall(r"```python\n(.*?)```", GUIDE.read_text(), re.DOTALL)
    namespace: dict[str, object] = {}
    exec(compile(task_code, str(GUIDE), "exec"), namespace)  # what `spear up --task shop:shop` imports
    async with AsyncExitStack() as stack:
        await components.start_worker(stack, spear.nc, spear.settings, [namespace["shop"]])
        env = {**os.environ, "SPEAR_NATS_URL": spear.settings.nats.urls[0], "SPEAR_SUBJECT_PREFIX": spear.names.prefix}
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-c", client_code, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
        )
        out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, err.decode()
    assert out.decode().splitlines() == ["33.55", "{'order_id': 'A-17', 'attempt': 1}"]
