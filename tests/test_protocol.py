"""The wire format: signing, envelopes and frames, including hostile and truncated bytes."""

from __future__ import annotations

import hashlib
import struct
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from async_ca_exec import protocol as p

KEY = b"k" * 32
FN = b"function-pickle"
FN_HASH = hashlib.sha256(FN).hexdigest()


def envelope(**kw: object) -> bytes:
    args = {"call_id": "job-00001", "n": 1, "fn": FN, "fn_hash": FN_HASH, "items": b"items", "timeout": 5.0}
    args.update(kw)
    return p.encode_invocation(**args)  # type: ignore[arg-type]


def test_signed_request_verifies_and_returns_its_call_id() -> None:
    body = envelope()
    headers = p.signed_headers(KEY, "POST", p.INVOKE_PATH, "job-00001", body)
    assert p.verify(KEY, "POST", p.INVOKE_PATH, headers, body) == "job-00001"


@pytest.mark.parametrize(
    "change",
    ["other key", "tampered body", "other path", "other method", "other call id", "no signature", "no timestamp"],
)
def test_signature_refuses_any_change(change: str) -> None:
    body = envelope()
    headers = p.signed_headers(KEY, "POST", p.INVOKE_PATH, "job-00001", body)
    key, method, path = KEY, "POST", p.INVOKE_PATH
    if change == "other key":
        key = b"x" * 32
    elif change == "tampered body":
        body = body[:-1] + b"X"
    elif change == "other path":
        path = p.META_PATH
    elif change == "other method":
        method = "GET"
    elif change == "other call id":
        headers[p.H_CALL_ID] = "job-00002"
    elif change == "no signature":
        del headers[p.H_SIGNATURE]
    elif change == "no timestamp":
        del headers[p.H_TIMESTAMP]
    with pytest.raises(p.SignatureError):
        p.verify(key, method, path, headers, body)


def test_stale_and_future_timestamps_are_refused() -> None:
    body = b""
    old = p.signed_headers(KEY, "GET", p.META_PATH, "m", body, now=time.time() - 3600)
    with pytest.raises(p.SignatureError, match="stale"):
        p.verify(KEY, "GET", p.META_PATH, old, body)
    future = p.signed_headers(KEY, "GET", p.META_PATH, "m", body, now=time.time() + 3600)
    with pytest.raises(p.SignatureError, match="stale"):
        p.verify(KEY, "GET", p.META_PATH, future, body)
    for bad in ("nan", "inf", "soon", ""):
        with pytest.raises(p.SignatureError):
            p.check_fresh(bad)


def test_envelope_round_trip_keeps_every_field() -> None:
    body = envelope(n=3, extra={"skip": [2, 0]})
    inv = p.decode_invocation(body)
    assert (inv.call_id, inv.n, inv.fn_hash, bytes(inv.fn), bytes(inv.items), inv.timeout, inv.skip) == (
        "job-00001",
        3,
        FN_HASH,
        FN,
        b"items",
        5.0,
        (0, 2),
    )


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"", "truncated"),
        (b"ACXQ", "truncated"),
        (b"XXXX" + envelope()[4:], "magic"),
        (envelope()[:4] + b"\x09" + envelope()[5:], "protocol version"),
        (envelope()[:-1], "do not add up"),
        (envelope() + b"extra", "do not add up"),
    ],
)
def test_malformed_envelopes_are_refused_with_a_reason(body: bytes, message: str) -> None:
    with pytest.raises(p.ProtocolError, match=message):
        p.decode_invocation(body)


@pytest.mark.parametrize(
    ("header", "message"),
    [
        ({"id": 5}, "'id'"),
        ({"id": "bad id with spaces"}, "call id"),
        ({"n": 0}, "'n'"),
        ({"n": True}, "'n'"),
        ({"fn": "abc"}, "'fn'"),
        ({"timeout": -1}, "'timeout'"),
        ({"timeout": "5"}, "'timeout'"),
        ({"skip": [7]}, "'skip'"),
        ({"skip": [0]}, "no item"),
    ],
)
def test_envelope_header_fields_are_validated(header: dict[str, object], message: str) -> None:
    import json

    fields = {"id": "job-00001", "n": 1, "fn": FN_HASH, "timeout": 5.0}
    fields.update(header)
    hj = json.dumps(fields).encode()
    body = struct.pack("<4sBBHIII", b"ACXQ", p.PROTOCOL_VERSION, 0, 0, len(hj), len(FN), 5) + hj + FN + b"items"
    with pytest.raises(p.ProtocolError, match=message):
        p.decode_invocation(body)


def test_function_bytes_must_match_their_hash() -> None:
    with pytest.raises(p.ProtocolError, match="SHA-256"):
        p.decode_invocation(envelope(fn=b"other function"))


def test_timeout_above_the_runtime_limit_is_refused() -> None:
    with pytest.raises(p.ProtocolError, match="maximum"):
        p.decode_invocation(envelope(timeout=100.0), max_timeout=10.0)


def test_frames_split_a_body_and_reject_truncation() -> None:
    payload = p.encode_outcome_payload({"first": 0, "n": 1}, b"blob")
    parts = [p.HEARTBEAT_FRAME, p.encode_log(0, p.STDOUT, "hi\n"), p.frame(p.F_OUTCOME, payload), p.END_FRAME]
    body = b"".join(parts)
    boundaries = {sum(len(x) for x in parts[:k]) for k in range(len(parts) + 1)}
    frames = list(p.iter_frames(body))
    assert [t for t, _ in frames] == [p.F_HEARTBEAT, p.F_LOG, p.F_OUTCOME, p.F_END]
    assert p.decode_log(frames[1][1]) == (0, p.STDOUT, "hi\n")
    meta, blob = p.decode_outcome_payload(frames[2][1])
    assert meta == {"first": 0, "n": 1} and bytes(blob) == b"blob"
    for cut in range(1, len(body)):
        if cut in boundaries:
            continue  # a cut between frames is a shorter stream; END tells it from a whole one
        with pytest.raises(p.ProtocolError, match="truncated"):
            list(p.iter_frames(body[:cut]))


def test_oversized_and_unknown_frames_are_refused() -> None:
    with pytest.raises(p.PayloadTooLarge):
        p.parse_frame_header(p.frame_header(p.F_OUTCOME, 1000), max_frame=999)
    with pytest.raises(p.ProtocolError, match="unknown frame type"):
        p.parse_frame_header(p.frame_header(99, 0))


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=400))
def test_arbitrary_bytes_never_crash_the_envelope_decoder(data: bytes) -> None:
    try:
        p.decode_invocation(data)
    except p.ProtocolError:
        pass


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=400))
def test_arbitrary_bytes_never_crash_the_frame_decoders(data: bytes) -> None:
    try:
        for ftype, payload in p.iter_frames(data, max_frame=1 << 16):
            if ftype == p.F_LOG:
                p.decode_log(payload)
            elif ftype == p.F_OUTCOME:
                p.decode_outcome_payload(payload)
    except p.ProtocolError:
        pass


@settings(max_examples=200, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(["id", "n", "fn", "timeout", "skip", "x"]),
        st.one_of(
            st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=70), st.lists(st.integers(), max_size=3)
        ),
    )
)
def test_arbitrary_json_headers_never_crash_the_decoder(header: dict[str, object]) -> None:
    import json

    hj = json.dumps(header).encode()
    body = struct.pack("<4sBBHIII", b"ACXQ", p.PROTOCOL_VERSION, 0, 0, len(hj), len(FN), 1) + hj + FN + b"i"
    try:
        p.decode_invocation(body)
    except p.ProtocolError:
        pass


def test_head_signature_authenticates_headers_and_length_before_the_body() -> None:
    body = envelope()
    headers = p.signed_headers(KEY, "POST", p.INVOKE_PATH, "job-00001", body)
    p.verify_head(KEY, "POST", p.INVOKE_PATH, headers, len(body))
    with pytest.raises(p.SignatureError, match="mismatch"):
        p.verify_head(b"o" * 32, "POST", p.INVOKE_PATH, headers, len(body))
    with pytest.raises(p.SignatureError, match="mismatch"):
        p.verify_head(KEY, "POST", p.INVOKE_PATH, headers, len(body) + 1)
    with pytest.raises(p.SignatureError, match="Content-Length"):
        p.verify_head(KEY, "POST", p.INVOKE_PATH, headers, None)
    del headers[p.H_HEAD_SIGNATURE]
    with pytest.raises(p.SignatureError, match="unsigned"):
        p.verify_head(KEY, "POST", p.INVOKE_PATH, headers, len(body))


def test_gets_are_signed_as_in_protocol_1_so_any_runtime_tells_its_version() -> None:
    import hashlib
    import hmac

    h = p.signed_headers(KEY, "GET", p.META_PATH, "", b"", now=1000.0)
    v1_full = f"GET\n{p.META_PATH}\n1000.000\n\n{hashlib.sha256(b'').hexdigest()}".encode()
    v1_head = f"acx-head\nGET\n{p.META_PATH}\n1000.000\n\n0".encode()
    assert h[p.H_SIGNATURE] == hmac.new(KEY, v1_full, hashlib.sha256).hexdigest()
    assert h[p.H_HEAD_SIGNATURE] == hmac.new(KEY, v1_head, hashlib.sha256).hexdigest()
    # Calls sign their attempt: the same request as another attempt has another signature.
    body = envelope()
    assert (
        p.signed_headers(KEY, "POST", p.INVOKE_PATH, "job-00001", body, now=1000.0)[p.H_SIGNATURE]
        != p.signed_headers(KEY, "POST", p.INVOKE_PATH, "job-00001", body, now=1000.0, attempt=1)[p.H_SIGNATURE]
    )
