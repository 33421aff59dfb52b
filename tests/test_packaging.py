"""pyproject.toml names every package directory: setuptools warns at each install about a
directory it would leave out (`spear/api/web/` was one), and a directory it leaves out is missing
from the wheel. tests/test_wheel.py installs a real wheel; this is the quick check."""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_directory_under_spear_is_a_listed_package():
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(setuptools["packages"])
    directories = {
        ".".join(path.relative_to(ROOT).parts)
        for path in [ROOT / "spear", *(ROOT / "spear").rglob("*")]
        if path.is_dir() and path.name != "__pycache__" and any(p.is_file() for p in path.iterdir())
    }
    assert directories - listed == set()
    data = setuptools["package-data"]
    assert all(package in listed for package in data), data
