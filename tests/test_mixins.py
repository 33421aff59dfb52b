"""`Service` is assembled from mixins (`Reads`, `TaskOperations`). A mixin declares what it uses of
the others inside `if TYPE_CHECKING:` so that mypy checks its calls; mypy does not check that the
assembled class has them. This does: a method named there and missing at run time is an
AttributeError on the first call (one slipped through once: `_states`, used by `delete_task`)."""

import ast
from pathlib import Path

import spear.service
from spear.service.operations import Service


def _declared_for_type_checking_only(source: str) -> set[str]:
    names: set[str] = set()
    for klass in (node for node in ast.walk(ast.parse(source)) if isinstance(node, ast.ClassDef)):
        for block in klass.body:
            if isinstance(block, ast.If) and isinstance(block.test, ast.Name) and block.test.id == "TYPE_CHECKING":
                names |= {d.name for d in block.body if isinstance(d, (ast.FunctionDef, ast.AsyncFunctionDef))}
    return names


def test_every_method_a_mixin_expects_of_service_exists():
    package = Path(spear.service.__file__).parent
    expected = set().union(*(_declared_for_type_checking_only(p.read_text()) for p in package.glob("*.py")))
    assert expected, "no mixin declares anything: the check checks nothing"
    assert {name for name in expected if not hasattr(Service, name)} == set()
