"""`spear/core` is the pure heart: no module in it imports nats, aiohttp or opentelemetry."""

import ast
from pathlib import Path

import spear.core

FORBIDDEN = ("nats", "aiohttp", "opentelemetry")


def _imported(tree: ast.AST) -> list[str]:
    names: list[str] = []
    for node in ast.walk(tree):  # every import, also those inside functions
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
    return names


def test_core_imports_neither_nats_nor_aiohttp_nor_opentelemetry():
    core = Path(spear.core.__file__).parent
    modules = sorted(core.rglob("*.py"))
    assert len(modules) > 5  # the walk found the package
    offending = [
        f"{module.relative_to(core)}: {name}"
        for module in modules
        for name in _imported(ast.parse(module.read_text(), str(module)))
        if name.split(".")[0] in FORBIDDEN
    ]
    assert offending == []


def test_the_check_sees_imports_wherever_they_are():
    tree = ast.parse("def f():\n    import nats.errors\n    from aiohttp import web\n")
    assert _imported(tree) == ["nats.errors", "aiohttp"]
