"""Artifacts of registered tasks on disk: where they are (only under `[tasks] artifact_roots`,
symlinks and `..` resolved), their checksums, and what functions they offer.

Used at registration (the service) and before each use (the worker), so both read a location
the same way:
- `process`: `location` is an executable file, absolute or relative to a root.
- `python`: `path/file.py:attr` (a file, as above) or `pkg.module:attr` (looked up in the roots as
  if each were on sys.path); `attr` names a `spear.Task`. The module is loaded from its file, as a
  fresh module per task instance, with its root on sys.path for its own imports.
The checksum is the SHA-256 of that one file.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import types
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec

from spear.core.contract import ArtifactSpec, FunctionInfo, validate_id
from spear.core.enums import ApiError, ErrorCode
from spear.environment import for_programs
from spear.interpreter import PYTHON

HEX = re.compile(r"[0-9a-f]{64}")
DESCRIBE_TIMEOUT_S = 30.0
MODULE_PREFIX = "spear_artifact_"  # the name of each loaded artifact module: this and a fresh id


@dataclass(frozen=True)
class Located:
    """An artifact's file, resolved under a root, and what to take from it."""

    path: Path
    root: Path
    attr: str = ""  # python: the spear.Task's name in the module


def parse_checksum(text: str) -> str:
    """`sha256:<hex>` or bare hex, as lower-case hex; empty stays empty. INVALID_ARGUMENT otherwise."""
    digest = text.strip().lower()
    digest = digest.removeprefix("sha256:")
    if digest and not HEX.fullmatch(digest):
        raise ApiError(
            ErrorCode.INVALID_ARGUMENT, f"checksum must be sha256:<64 hex digits> or 64 hex digits, not {text!r}"
        )
    return digest


def file_sha256(path: Path) -> str:
    """The SHA-256 of a file's bytes, in hex."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 16), b""):
            digest.update(block)
    return digest.hexdigest()


def locate(spec: ArtifactSpec, roots: list[str]) -> Located:
    """The artifact's file under one of `roots`; PERMISSION_DENIED naming the path if it resolves
    anywhere else, INVALID_ARGUMENT if it is not there or not usable."""
    if "\x00" in spec.location:
        raise ApiError(ErrorCode.INVALID_ARGUMENT, "artifact location must not contain NUL characters")
    try:
        return _locate(spec, roots)
    except (OSError, RuntimeError) as exc:  # a name too long, a symlink loop, an unreadable directory
        raise ApiError(ErrorCode.INVALID_ARGUMENT, f"artifact {spec.location!r} cannot be resolved: {exc}") from None


def _locate(spec: ArtifactSpec, roots: list[str]) -> Located:
    if not roots:
        raise ApiError(ErrorCode.PERMISSION_DENIED, "no [tasks] artifact_roots are configured: no artifact is allowed")
    resolved_roots = [Path(root).resolve() for root in roots]
    location, attr = spec.location, ""
    if spec.artifact_type == "python":
        location, sep, attr = spec.location.rpartition(":")
        if not sep or not location or not attr.replace(".", "").replace("_", "").isalnum():
            raise ApiError(
                ErrorCode.INVALID_ARGUMENT,
                f"python artifact location must be pkg.module:attr or path/file.py:attr, not {spec.location!r}",
            )
        if not location.endswith(".py") and "/" not in location:
            return _module_file(location, attr, resolved_roots)
    path = Path(location)
    candidates = [path] if path.is_absolute() else [root / path for root in resolved_roots]
    for candidate in candidates:
        real = candidate.resolve()
        root = next((r for r in resolved_roots if real.is_relative_to(r)), None)
        if root is None:
            allowed = ", ".join(map(str, resolved_roots))
            raise ApiError(
                ErrorCode.PERMISSION_DENIED,
                f"artifact {location!r} resolves to {str(real)!r}, outside the artifact roots ({allowed})",
            )
        if real.is_file():
            if spec.artifact_type == "process" and not os.access(real, os.X_OK):
                raise ApiError(ErrorCode.INVALID_ARGUMENT, f"artifact {str(real)!r} is not executable")
            return Located(real, root, attr)
    raise ApiError(ErrorCode.INVALID_ARGUMENT, f"artifact {location!r}: no such file under the artifact roots")


def _module_file(module: str, attr: str, roots: list[Path]) -> Located:
    parts = module.split(".")
    if not all(part.isidentifier() for part in parts):
        raise ApiError(ErrorCode.INVALID_ARGUMENT, f"{module!r} is not a module name")
    for root in roots:
        base = root.joinpath(*parts)
        for candidate in (base.with_suffix(".py"), base / "__init__.py"):
            real = candidate.resolve()
            if candidate.is_file():
                if not real.is_relative_to(root):
                    raise ApiError(
                        ErrorCode.PERMISSION_DENIED,
                        f"module {module!r} resolves to {str(real)!r}, outside the artifact roots",
                    )
                return Located(real, root, attr)
    raise ApiError(ErrorCode.INVALID_ARGUMENT, f"no module {module!r} under the artifact roots")


def verified(spec: ArtifactSpec, roots: list[str]) -> tuple[Located, str]:
    """The artifact's file and checksum, checked against the one the spec names (if any)."""
    located = locate(spec, roots)
    actual = file_sha256(located.path)
    wanted = parse_checksum(spec.checksum)
    if wanted and wanted != actual:
        raise ApiError(
            ErrorCode.INVALID_ARGUMENT,
            f"checksum mismatch for {str(located.path)!r}: the spec says sha256:{wanted}, the file is sha256:{actual}",
        )
    return located, actual


def process_functions(spec: ArtifactSpec) -> list[FunctionInfo]:
    """A process artifact's functions: `run`, or those `metadata.functions` names (comma-separated).
    Its parameters are whatever JSON object the call sends: any name is accepted."""
    names = [name.strip() for name in spec.metadata.get("functions", "run").split(",") if name.strip()]
    if not names:
        raise ApiError(ErrorCode.INVALID_ARGUMENT, "metadata.functions names no function")
    for name in names:
        validate_id(name, "a function name in metadata.functions")
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:  # (a probe's " add , mul ,,add" listed `add` twice)
        raise ApiError(ErrorCode.INVALID_ARGUMENT, f"metadata.functions names {', '.join(twice)} more than once")
    return [FunctionInfo(name=name, accepts_any=True, description=f"runs {spec.location} {name}") for name in names]


class ArtifactChanged(Exception):
    """The file's bytes are not those registered (checked on the bytes that are then run)."""


def verified_bytes(located: Located, checksum: str) -> bytes:
    """The file's bytes, read once, if they are those registered (else ArtifactChanged)."""
    data = located.path.read_bytes()
    if (actual := hashlib.sha256(data).hexdigest()) != checksum:
        raise ArtifactChanged(f"{str(located.path)!r} is sha256:{actual}, registered sha256:{checksum}")
    return data


SOURCE_ATTRIBUTE = "__spear_source__"  # the bytes a loaded artifact module ran, for a child to run too


def load_task(located: Located, checksum: str | None = None) -> Any:
    """Load a python artifact's file as a fresh module and return its `spear.Task` (or raise).

    The file is read once: those bytes are checked against `checksum` (ArtifactChanged) and they
    are what runs, here and in a child process (kept on the module as SOURCE_ATTRIBUTE). Loading
    by path after a check would run whatever the file held by then."""
    from spear.worker.tasks import Task

    source = located.path.read_bytes() if checksum is None else verified_bytes(located, checksum)
    if str(located.root) not in sys.path:
        sys.path.append(str(located.root))
    name, package = f"{MODULE_PREFIX}{uuid.uuid4().hex}", package_of(located)
    module = module_from_source(name, source, str(located.path), package)
    value: Any = module
    for part in located.attr.split("."):
        if not hasattr(value, part):  # (said of the file, not of the module's internal name: probe56)
            raise AttributeError(f"{located.path.name} has no {located.attr!r}: no attribute {part!r} there")
        value = getattr(value, part)
    if not isinstance(value, Task):
        raise TypeError(f"{located.attr} in {located.path} is a {type(value).__name__}, not a spear.Task")
    return value


def package_of(located: Located) -> str:
    """The package a python artifact's file is in, as Python would name it with the root on
    sys.path (`pkg.sub` for `<root>/pkg/sub/tasks.py`; "" for a file right in the root), so that
    its relative imports (`from . import helpers`) work (probe28: "attempted relative import with
    no known parent package")."""
    try:
        parts = located.path.parent.relative_to(located.root).parts
    except ValueError:
        return ""
    return ".".join(parts) if all(part.isidentifier() for part in parts) else ""


def module_from_source(name: str, source: bytes, origin: str, package: str = "") -> types.ModuleType:
    """A fresh module `name` made by running `source` (read from the file `origin`), in `package`
    (what its relative imports are relative to)."""
    module = types.ModuleType(name)
    module.__file__ = origin
    module.__package__ = package
    setattr(module, SOURCE_ATTRIBUTE, source)
    sys.modules[name] = module  # dataclasses and pickling look modules up by name
    try:
        exec(compile(source, origin, "exec"), module.__dict__)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return module


def describe_python(located: Located) -> list[FunctionInfo]:
    """The functions of a python artifact, learnt in a child process: its code never runs inside
    the service. INVALID_ARGUMENT with the reason if it does not load."""
    command = [*PYTHON, "-m", "spear.artifacts", str(located.path), str(located.root), located.attr]
    try:
        # (the module's code runs there: not with the gateway's `SPEAR_*` settings, its NATS login)
        done = subprocess.run(command, capture_output=True, timeout=DESCRIBE_TIMEOUT_S, check=False, env=for_programs())
    except subprocess.TimeoutExpired:
        raise ApiError(
            ErrorCode.INVALID_ARGUMENT, f"loading {str(located.path)!r} took over {DESCRIBE_TIMEOUT_S:g} s"
        ) from None
    if done.returncode != 0:
        reason = done.stderr.decode(errors="replace").strip().splitlines()
        raise ApiError(
            ErrorCode.INVALID_ARGUMENT,
            f"python artifact {str(located.path)!r} does not load: {reason[-1] if reason else done.returncode}",
        )
    # The description is the last line: whatever the module printed while importing comes before.
    lines = done.stdout.strip().splitlines()
    try:
        return msgspec.json.decode(lines[-1] if lines else b"", type=list[FunctionInfo])
    except msgspec.DecodeError:
        raise ApiError(
            ErrorCode.INVALID_ARGUMENT, f"python artifact {str(located.path)!r} could not be described"
        ) from None


def _describe_main(path: str, root: str, attr: str) -> int:
    try:
        task = load_task(Located(Path(path), Path(root), attr))
    except BaseException as exc:  # the user's module: whatever it raised, said in one line
        print(f"{type(exc).__name__}: {' '.join(str(exc).split())}", file=sys.stderr)
        return 1
    functions = [function.info() for _, function in sorted(task.functions.items())]
    sys.stdout.write("\n" + json.dumps(msgspec.to_builtins(functions)) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(_describe_main(*sys.argv[1:4]))
