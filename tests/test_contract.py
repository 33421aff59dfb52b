import time

import hypothesis
import msgspec
import pytest
from hypothesis import strategies as st

from spear.core import contract
from spear.core.contract import ApiError, InvokeFunctionRequest
from spear.core.enums import HTTP_STATUS, ErrorCode, ExecutionMode, ExecutionStatus, InvocationType


@pytest.mark.parametrize("given", ["EXECUTION_MODE_ASYNC", "ASYNC", "async", "Async", "mode_async"])
def test_enum_accepts_full_name_or_suffix_in_any_case(given):
    assert ExecutionMode.parse(given, "execution_mode") == "EXECUTION_MODE_ASYNC"


@pytest.mark.parametrize("given", ["", "ASYN", "BATCH", 4, -1, True, 2.0, None])
def test_enum_rejects_other_values(given):
    with pytest.raises(ApiError) as err:
        ExecutionMode.parse(given, "execution_mode")
    assert err.value.code == ErrorCode.INVALID_ARGUMENT


@pytest.mark.parametrize("given", ["TASK", "task"])
def test_an_ambiguous_suffix_is_refused_not_guessed(given):
    with pytest.raises(ApiError) as err:
        InvocationType.parse(given, "invocation_type")
    assert err.value.code == ErrorCode.INVALID_ARGUMENT and "ambiguous" in err.value.message
    assert InvocationType.parse("new_task", "invocation_type") is InvocationType.NEW_TASK


def test_a_status_filter_can_be_limited_to_real_statuses():
    from spear.core.enums import STATUSES

    assert ExecutionStatus.parse("completed", "status", STATUSES) is ExecutionStatus.COMPLETED
    with pytest.raises(ApiError):
        ExecutionStatus.parse("UNKNOWN", "status", STATUSES)


@pytest.mark.parametrize(
    "enum, numbered",
    [
        (InvocationType, [InvocationType.NEW_TASK, InvocationType.EXISTING_TASK]),
        (ExecutionMode, [ExecutionMode.SYNC, ExecutionMode.ASYNC, ExecutionMode.STREAM]),
        (ExecutionStatus, ["PENDING", "RUNNING", "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"]),
    ],
)
def test_enum_input_takes_spears_proto_numbers_and_its_zero_value_as_not_set(enum, numbered):
    """SPEAR's function.proto numbers each enum from 1, its zero being *_UNKNOWN; a protojson
    client may send numbers, and sends the zero value for a field it never set (review14)."""
    for number, member in enumerate(numbered, start=1):
        assert enum.parse_input(number, "f", "default") is enum.parse(str(member), "f")
    zero_name = {InvocationType: "INVOCATION_TYPE_UNKNOWN", ExecutionMode: "EXECUTION_MODE_UNKNOWN"}.get(
        enum, "EXECUTION_STATUS_UNKNOWN"
    )
    for unset in (0, "", zero_name, zero_name.lower(), "unknown"):
        assert enum.parse_input(unset, "f", "default") == "default"
    for wrong in (len(numbered) + 1, -1, True, "nope"):
        with pytest.raises(ApiError):
            enum.parse_input(wrong, "f", "default")


def test_a_numbered_status_filter_is_limited_to_real_statuses_too():
    from spear.core.enums import STATUSES

    assert ExecutionStatus.parse_input(3, "status", None, STATUSES) is ExecutionStatus.COMPLETED
    assert ExecutionStatus.parse_input("EXECUTION_STATUS_UNKNOWN", "status", None, STATUSES) is None


def test_enums_write_their_full_names():
    assert msgspec.json.encode(contract.ExecutionResult(status=ExecutionStatus.TIMEOUT))[:39] == (
        b'{"status":"EXECUTION_STATUS_TIMEOUT","r'
    )


@pytest.mark.parametrize("good", ["demo", "a", "A-b_9", "x" * 128])
def test_ids_from_the_allowed_alphabet_pass(good):
    assert contract.validate_id(good, "task_id") == good


@pytest.mark.parametrize("bad", ["", "a.b", "*", ">", "a b", "a\tb", "x" * 129, "é", 7, None, ["a"]])
def test_ids_that_could_inject_subject_tokens_are_rejected(bad):
    with pytest.raises(ApiError) as err:
        contract.validate_id(bad, "task_id")
    assert err.value.code == ErrorCode.INVALID_ARGUMENT
    assert "task_id" in err.value.message


@pytest.mark.parametrize(
    "body, code",
    [
        (b"", ErrorCode.INVALID_ARGUMENT),
        (b"{", ErrorCode.INVALID_ARGUMENT),
        (b"[1, 2]", ErrorCode.INVALID_ARGUMENT),
        (b'"text"', ErrorCode.INVALID_ARGUMENT),
        (b'{"task_id": "demo", "parameters": {"n": 1}}', ErrorCode.INVALID_ARGUMENT),
        (b'{"task_id": "demo", "context": {"timeout_ms": "soon"}}', ErrorCode.INVALID_ARGUMENT),
        (b'{"task_id": "demo", "unknown_field": 1}', ErrorCode.INVALID_ARGUMENT),
        (b'{"task_id": "demo", "pad": "' + b"x" * 2000 + b'"}', ErrorCode.PAYLOAD_TOO_LARGE),
    ],
)
def test_bad_bodies_map_to_clear_errors(body, code):
    with pytest.raises(ApiError) as err:
        contract.decode_request(body, InvokeFunctionRequest, max_bytes=1000)
    assert err.value.code == code
    assert err.value.message


def test_http_status_for_every_code():
    assert HTTP_STATUS[ErrorCode.NOT_FOUND] == 404
    assert HTTP_STATUS[ErrorCode.RESOURCE_EXHAUSTED] == 429
    assert HTTP_STATUS[ErrorCode.DEADLINE_EXCEEDED] == 504
    assert ApiError(ErrorCode.PAYLOAD_TOO_LARGE, "x").http_status == 413


def test_timestamps_are_rfc3339_utc_with_milliseconds():
    text = contract.format_timestamp(1736937000.123)
    assert text == "2025-01-15T10:30:00.123Z"
    assert abs(contract.parse_timestamp(text) - 1736937000.123) < 1e-6


def _strftime_timestamp(epoch_seconds: float) -> str:
    """format_timestamp as it was before it kept the whole-second part (strftime every call)."""
    seconds, ms = divmod(int(epoch_seconds * 1000), 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{ms:03d}Z"


@hypothesis.settings(max_examples=300, deadline=None)
@hypothesis.given(
    st.lists(
        st.one_of(
            st.floats(min_value=-86_400 * 365, max_value=4_102_444_800, allow_nan=False),
            st.integers(min_value=1_700_000_000_000, max_value=1_700_000_003_000).map(lambda ms: ms / 1000),
        ),
        min_size=1,
        max_size=30,
    )
)
def test_format_timestamp_gives_what_strftime_gives_in_any_order(times):
    # the whole-second part is remembered from the call before: any sequence of calls, same text
    for epoch in times:
        assert contract.format_timestamp(epoch) == _strftime_timestamp(epoch)


def test_reply_error_maps_unsuccessful_replies():
    not_found = contract.GetExecutionStatusResponse(found=False, message="gone")
    assert contract.reply_error(not_found).code == ErrorCode.NOT_FOUND
    late = contract.InvokeFunctionResponse(
        success=False, message="late", execution_id="e", task_id="t", result=None, error_code="DEADLINE_EXCEEDED"
    )
    assert contract.reply_error(late).http_status == 504
    ok = contract.InvokeFunctionResponse(success=True, message="", execution_id="e", task_id="t", result=None)
    assert contract.reply_error(ok) is None


def test_request_defaults_follow_the_contract():
    request = msgspec.json.decode(b'{"task_id": "demo", "function_name": "echo"}', type=InvokeFunctionRequest)
    assert request.execution_mode == "EXECUTION_MODE_SYNC"
    assert request.context.max_retries is None and request.context.timeout_ms == 0
