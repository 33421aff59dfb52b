"""`pip install .` ships what is read at run time: a wheel built from the tree (in pip's isolated
build environment, as a user's install does it) holds the stream definitions and the web view's
files (setuptools ships only Python modules unless told)."""

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent


@pytest.mark.slow
def test_the_wheel_holds_the_web_view_and_the_stream_definitions(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", str(tmp_path), str(ROOT)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = tmp_path.glob("spear-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    web = {p.name for p in (ROOT / "spear" / "api" / "web").iterdir()}
    assert {f"spear/api/web/{name}" for name in web} <= names
    assert {"index.html", "app.css", "app.js"} <= web
    assert any(name.startswith("spear/streams/") and name.endswith(".json") for name in names)
