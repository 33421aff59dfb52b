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
