"""What a request that is not JSON spear takes is told: the reason, not a misleading one."""

import pytest

from spear.core.jsonlimits import JsonRejected, decode_limited


@pytest.mark.parametrize(
    ("body", "said"),
    [
        # a probe: msgspec calls a lone surrogate escape "truncated", in a complete document
        (b'{"a": "\\ud800"}', "a \\u escape names a lone surrogate (half of a UTF-16 pair), which is no character"),
        (b'{"a": "x\\udfff"}', "invalid utf-16 surrogate pair"),  # a low half alone: msgspec says so
        (b'{"a": "\\ud800', "Input data was truncated"),  # truncated indeed
        (b'{"a":', "Input data was truncated"),
        (b'{"a": NaN}', "malformed"),
    ],
)
def test_a_malformed_document_is_refused_with_its_reason(body, said):
    with pytest.raises(JsonRejected, match="malformed JSON") as refused:
        decode_limited(body, dict, 1000)
    assert said in str(refused.value), str(refused.value)


def test_a_whole_surrogate_pair_is_a_character():
    assert decode_limited(b'{"a": "\\ud83d\\ude00"}', dict, 1000) == {"a": "\U0001f600"}


def test_a_lone_surrogate_too_deep_for_the_check_of_the_rest_is_refused_not_an_internal_error():
    """Deep enough for msgspec to stop at the surrogate was too deep for the standard library's
    check of the rest behind a server's frames: its RecursionError escaped as a 500 (a review, at
    937-945 levels over HTTP). Here the check meets a document deeper than any stack."""
    import msgspec

    from spear.core.jsonlimits import _said

    body = b"[" * 200_000 + b'"\\ud800"' + b"]" * 200_000
    assert _said(msgspec.DecodeError("Input data was truncated"), body) == "Input data was truncated"
