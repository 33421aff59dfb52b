"""The README's Python client examples run as written, each as its own script, against spear's
real components (`SPEAR_NATS_URL` and `SPEAR_SUBJECT_PREFIX` point `spear.Client()` at them)."""

from __future__ import annotations

import asyncio
import os
import re
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

README = Path(__file__).parent.parent / "README.md"


def client_examples() -> list[str]:
    section = README.read_text().split("## Python client", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, re.DOTALL)


def test_the_readme_has_the_examples():
    examples = client_examples()
    assert len(examples) == 3
    assert "spear.Client()" in examples[0] and "client.stream(" in examples[1] and "SyncClient" in examples[2]


async def run_example(code: str, spear) -> tuple[int, str, str]:
    env = {**os.environ, "SPEAR_NATS_URL": spear.settings.nats.urls[0], "SPEAR_SUBJECT_PREFIX": spear.names.prefix}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", code, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(process.communicate(), 60)
    return process.returncode or 0, out.decode(), err.decode()


async def test_the_async_client_example(spear):
    code, out, err = await run_example(client_examples()[0], spear)
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == "832040"
    assert lines[1].startswith("FUNCTION_ERROR RuntimeError: boom ")
    assert "100% step 4 of 4" in lines
    assert "{'dataset': 'sales', 'steps': 4}" in lines
    assert re.fullmatch(r"cancelled \S+ cancelled", lines[-1])


async def test_the_stream_example(spear):
    code, out, err = await run_example(client_examples()[1], spear)
    if "EXECUTION_MODE_STREAM is not supported" in err or "no function 'generate_text'" in err:
        pytest.xfail("STREAM mode is not on main yet (built by another change)")
    assert code == 0, err
    assert len(out.splitlines()) == 5


async def test_the_sync_client_example(spear):
    code, out, err = await run_example(client_examples()[2], spear)
    assert code == 0, err
    assert out.splitlines() == ["42", "nightly-2026-01-15 100"]
