"""spear's version (PEP 440, as pip and `spear --version` give it) in the form NATS micro services
must state theirs (Semantic Versioning 2.0.0), so that `$SRV.INFO` and ListWorkers name the build.

A build's version names its commit (`0.1.1.dev378+g2135fbf07`, pyproject.toml): as a service
version that is `0.1.1-dev.378+g2135fbf07`; a release `0.2.0` stays `0.2.0`.
"""

from __future__ import annotations

import re

_PEP440 = re.compile(r"(\d+)\.(\d+)(?:\.(\d+))?((?:\.?(?:a|b|rc|dev)\d+)*)(?:\.?post(\d+))?(?:\+([0-9A-Za-z._-]+))?")
_PART = re.compile(r"(a|b|rc|dev)(\d+)")


def semantic(version: str) -> str:
    """`version` as a semantic version: major.minor.patch, PEP 440's pre-release and development
    parts as its pre-release (they come before the release in both), a post-release and the local
    part as its build metadata (a post-release comes after its release; semantic versioning has no
    such thing). A version it cannot read (not one pip builds) becomes 0.0.0 with the text kept as
    build metadata."""
    match = _PEP440.fullmatch(version.strip())
    if match is None:
        kept = ".".join(part for part in re.split(r"[^0-9A-Za-z-]+", version) if part)
        return f"0.0.0+{kept}" if kept else "0.0.0"
    major, minor, patch, parts, post, local = match.groups()
    semver = f"{int(major)}.{int(minor)}.{int(patch or 0)}"
    pre = [f"{name}.{int(number)}" for name, number in _PART.findall(parts)]
    if pre:
        semver += "-" + ".".join(pre)
    build = [f"post.{int(post)}"] if post is not None else []
    build += [part for part in re.split(r"[._-]+", local or "") if part]
    if build:
        semver += "+" + ".".join(build)
    return semver
