"""The worker's lean read of a delivery's ack subject: what nats-py's metadata gives, on any input."""

from __future__ import annotations

import hypothesis
import pytest
from hypothesis import strategies as st
from nats.aio.msg import Msg

from spear.jetstream.pull import AckInfo, ack_info

_token = st.text(st.characters(min_codepoint=33, max_codepoint=126, exclude_characters="."), min_size=1, max_size=8)
_number = st.integers(min_value=0, max_value=2**63).map(str)


def _metadata(reply: str) -> AckInfo | type[Exception]:
    try:
        meta = Msg(_client=None, reply=reply).metadata  # type: ignore[arg-type]
    except Exception as exc:
        return type(exc)
    return AckInfo(meta.sequence.stream, meta.num_delivered)


def _lean(reply: str) -> AckInfo | type[Exception]:
    try:
        return ack_info(Msg(_client=None, reply=reply))  # type: ignore[arg-type]
    except Exception as exc:
        return type(exc)


@st.composite
def _ack_subjects(draw: st.DrawFn) -> str:
    numbers = draw(st.lists(_number, min_size=5, max_size=5))  # delivered, sseq, cseq, time, pending
    names = draw(st.lists(_token, min_size=2, max_size=2))  # stream, consumer
    if draw(st.booleans()):
        tokens = ["$JS", "ACK", *names, *numbers]
    else:  # with domain and account hash, and perhaps the random token at the end
        tokens = ["$JS", "ACK", draw(_token), draw(_token), *names, *numbers]
        tokens += draw(st.lists(_token, max_size=2))
    return ".".join(tokens)


@hypothesis.settings(max_examples=500, deadline=None)
@hypothesis.given(st.one_of(_ack_subjects(), st.text(max_size=60), st.lists(_token, max_size=13).map(".".join)))
def test_ack_info_reads_what_nats_py_metadata_reads(reply):
    expected, got = _metadata(reply), _lean(reply)
    if isinstance(expected, AckInfo):
        assert got == expected
    elif isinstance(got, AckInfo):  # lenient only about tokens it does not read (time, pending)
        tokens = reply.split(".")
        assert tokens[:2] == ["$JS", "ACK"] and (len(tokens) == 9 or len(tokens) >= 11)


@pytest.mark.parametrize(
    "reply",
    [
        "$JS.ACK.S.C.3.42.7.1700000000.0",
        "$JS.ACK.hub.ACCHASH.S.C.2.43.7.1700000000.0.token",
        "$JS.ACK.a.b.S.C.1.9.7.1.0",
    ],
)
def test_ack_info_of_either_ack_subject_form(reply):
    assert ack_info(Msg(_client=None, reply=reply)) == _metadata(reply)  # type: ignore[arg-type]
