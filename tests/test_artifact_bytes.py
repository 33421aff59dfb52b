"""A registered python artifact runs the bytes whose checksum was checked: read once by the worker
(a file changed after the check is not what runs), and handed to a process-isolated child as
bytes (the child never reads the file, which may have changed by then)."""

import hashlib
import sys

import pytest

from spear import artifacts
from spear.worker import isolation

SOURCE = b"""
import spear

task = spear.Task("bytes-checked")


@task.function
def which() -> str:
    return "the checked bytes"
"""


def test_a_python_artifact_is_loaded_from_the_bytes_it_checked(tmp_path):
    path = tmp_path / "artifact.py"
    path.write_bytes(SOURCE)
    located = artifacts.Located(path=path, root=tmp_path, attr="task")
    task = artifacts.load_task(located, hashlib.sha256(SOURCE).hexdigest())
    assert task.functions["which"].fn() == "the checked bytes"
    module = sys.modules[task.functions["which"].fn.__module__]
    assert getattr(module, artifacts.SOURCE_ATTRIBUTE) == SOURCE  # what a child is given to run
    path.write_bytes(SOURCE.replace(b"the checked bytes", b"something else"))
    with pytest.raises(artifacts.ArtifactChanged, match="registered sha256:"):
        artifacts.load_task(located, hashlib.sha256(SOURCE).hexdigest())


def test_a_child_makes_a_registered_module_from_the_bytes_it_is_given_not_from_the_file(tmp_path):
    gone = str(tmp_path / "no-longer-there.py")  # the file is not read: it may not even exist
    module = isolation._module("spear_artifact_child_test", gone, SOURCE, [])
    try:
        assert module.task.functions["which"].fn() == "the checked bytes"
        assert module.__file__ == gone  # tracebacks still name the file
    finally:
        sys.modules.pop("spear_artifact_child_test", None)
