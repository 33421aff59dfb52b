"""spear's PEP 440 version as the semantic version NATS micro services must state: a build's
commit kept, pre-releases still before their release, and never a version nats-py refuses (it
would stop the gateway, projection and workers from starting)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from nats.micro.service import SEMVER_REGEX

from spear import __version__
from spear.core.versions import semantic


@pytest.mark.parametrize(
    ("version", "expected"),
    [
        ("0.1.1.dev378+g2135fbf07.d20261201", "0.1.1-dev.378+g2135fbf07.d20261201"),  # a build of a commit
        ("0.2.0", "0.2.0"),
        ("1.0rc1", "1.0.0-rc.1"),
        ("1.0.0a2.dev3", "1.0.0-a.2.dev.3"),
        ("2.0.post1", "2.0.0+post.1"),  # after its release: not a pre-release
        ("0.0.0+unknown", "0.0.0+unknown"),  # a source tree never installed
        ("1!2.0", "0.0.0+1.2.0"),  # an epoch: not a version spear builds, kept as text
    ],
)
def test_a_pip_version_as_a_semantic_one(version, expected):
    assert semantic(version) == expected
    assert SEMVER_REGEX.match(expected)


@given(
    st.from_regex(
        r"\A[0-9]{1,3}\.[0-9]{1,3}(\.[0-9]{1,3})?((a|b|rc)[0-9]{1,3})?(\.post[0-9]{1,3})?(\.dev[0-9]{1,4})?(\+[a-z0-9]{1,8}(\.[a-z0-9]{1,8})?)?\Z"
    )
    | st.text(max_size=40)
)
def test_every_version_becomes_one_nats_micro_accepts(version):
    assert SEMVER_REGEX.match(semantic(version)), semantic(version)


def test_the_installed_version_is_stated_as_one():
    assert SEMVER_REGEX.match(semantic(__version__))
