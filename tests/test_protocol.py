"""The wire format: signing, envelopes and frames, including hostile and truncated bytes."""

from __future__ import annotations

import hashlib
import re
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


# The fast paths (precomputed HMAC pads, the usual header written by hand, JSON read without
# json.loads's checks around it) must give exactly what the plain library calls give.


@pytest.mark.parametrize("key", [b"", b"k", KEY, b"x" * 64, b"y" * 65, bytes(range(200)), bytearray(b"z" * 32)])
def test_signatures_are_hmac_sha256_of_the_documented_messages(key: bytes) -> None:
    import hmac

    body = envelope()
    digest = hashlib.sha256(body).hexdigest()
    h = p.signed_headers(key, "POST", p.INVOKE_PATH, "job-00001", body, now=1000.0, attempt=3)
    full = f"POST\n{p.INVOKE_PATH}\n1000.000\njob-00001\n3\n{digest}".encode()
    head = f"acx-head\nPOST\n{p.INVOKE_PATH}\n1000.000\njob-00001\n3\n{len(body)}".encode()
    assert h[p.H_SIGNATURE] == hmac.new(key, full, hashlib.sha256).hexdigest()
    assert h[p.H_HEAD_SIGNATURE] == hmac.new(key, head, hashlib.sha256).hexdigest()
    assert p.sign(key, "get", p.META_PATH, "1.5", "m", b"", attempt=7) == (
        hmac.new(key, f"GET\n{p.META_PATH}\n1.5\nm\n{hashlib.sha256(b'').hexdigest()}".encode(), hashlib.sha256).hexdigest()
    )


def test_signatures_stay_right_for_many_keys() -> None:
    import hmac

    for i in range(60):  # more keys than are kept precomputed
        key = i.to_bytes(2, "big") * (i + 1)
        assert (
            p.sign_head(key, "POST", "/", "1", "c", 5)
            == hmac.new(key, b"acx-head\nPOST\n/\n1\nc\n0\n5", hashlib.sha256).hexdigest()
        )


def test_a_signature_header_that_is_not_ascii_is_a_mismatch() -> None:
    body = envelope()
    headers = p.signed_headers(KEY, "POST", p.INVOKE_PATH, "job-00001", body)
    headers[p.H_SIGNATURE] = "é" * 64
    headers[p.H_HEAD_SIGNATURE] = "é" * 64
    with pytest.raises(p.SignatureError, match="mismatch"):
        p.verify(KEY, "POST", p.INVOKE_PATH, headers, body)
    with pytest.raises(p.SignatureError, match="mismatch"):
        p.verify_head(KEY, "POST", p.INVOKE_PATH, headers, len(body))


@settings(max_examples=300, deadline=None)
@given(
    st.text(max_size=30),
    st.one_of(st.integers(), st.booleans(), st.floats()),
    st.one_of(st.floats(), st.integers(), st.booleans()),
    st.sampled_from([None, {}, {"skip": [1]}, {"x": "é"}]),
)
def test_the_request_header_is_what_json_dumps_writes(call_id: str, n: object, timeout: object, extra: object) -> None:
    import json

    header: dict[str, object] = {"id": call_id, "n": n, "fn": FN_HASH, "timeout": timeout, **(extra or {})}  # type: ignore[dict-item]
    body = p.encode_invocation(call_id=call_id, n=n, fn=FN, fn_hash=FN_HASH, items=b"items", timeout=timeout, extra=extra)  # type: ignore[arg-type]
    hj = json.dumps(header, separators=(",", ":")).encode()
    assert body == struct.pack("<4sBBHIII", b"ACXQ", p.PROTOCOL_VERSION, 0, 0, len(hj), len(FN), 5) + hj + FN + b"items"


@pytest.mark.parametrize(
    "encode",
    [
        lambda h: json_dumps(h).encode(),
        lambda h: (" " + json_dumps(h) + "\n").encode(),
        lambda h: json_dumps(h).encode("utf-8-sig"),
        lambda h: json_dumps(h).encode("utf-16"),
        lambda h: json_dumps(h).encode("utf-32-le"),
        lambda h: json_dumps(h).encode()[:-1],
        lambda h: json_dumps(h).encode() + b"}",
        lambda h: json_dumps([h]).encode(),
        lambda h: b"\xff" + json_dumps(h).encode(),
        lambda h: b"",
    ],
)
def test_json_in_envelopes_and_frames_reads_as_json_loads_reads_it(encode: object) -> None:
    import json

    fields = {"id": "job-00001", "n": 1, "fn": FN_HASH, "timeout": 5.0, "x": "é", "first": 0}
    hj = encode(fields)  # type: ignore[operator]
    body = struct.pack("<4sBBHIII", b"ACXQ", p.PROTOCOL_VERSION, 0, 0, len(hj), len(FN), 5) + hj + FN + b"items"
    payload = memoryview(struct.pack("<I", len(hj)) + hj + b"blob")
    try:
        expected = json.loads(hj)
    except ValueError as exc:
        with pytest.raises(p.ProtocolError, match=f"^JSON header is not valid JSON: {re.escape(str(exc))}$"):
            p.decode_invocation(body)
        with pytest.raises(p.ProtocolError, match=f"^outcome meta is not valid JSON: {re.escape(str(exc))}$"):
            p.decode_outcome_payload(payload)
        return
    if not isinstance(expected, dict):
        with pytest.raises(p.ProtocolError, match="must be an object"):
            p.decode_invocation(body)
        with pytest.raises(p.ProtocolError, match="must be an object"):
            p.decode_outcome_payload(payload)
        return
    inv = p.decode_invocation(body)
    assert inv == p.Invocation("job-00001", 1, FN_HASH, memoryview(FN), memoryview(b"items"), 5.0, (), expected)
    meta, blob = p.decode_outcome_payload(payload)
    assert meta == expected and bytes(blob) == b"blob"


def json_dumps(obj: object) -> str:
    import json

    return json.dumps(obj, ensure_ascii=False)


def test_a_decoded_invocation_is_the_dataclass_with_every_field() -> None:
    import dataclasses

    inv = p.decode_invocation(envelope(n=2))
    assert list(vars(inv)) == [f.name for f in dataclasses.fields(p.Invocation)]
    assert inv == p.Invocation("job-00001", 2, FN_HASH, memoryview(FN), memoryview(b"items"), 5.0, (), inv.header)
    with pytest.raises(dataclasses.FrozenInstanceError):
        inv.n = 3  # type: ignore[misc]


# -- argument pickling ---------------------------------------------------------------------


class _Point:  # a class of the test module: cloudpickle may pickle it by value
    def __init__(self, x: int) -> None:
        self.x = x


@pytest.mark.parametrize(
    "items",
    [
        [((5,), {})],
        [((1, 2.5, "s", b"b", None, True, 3j), {"k": (1, "x"), "l": [1.0, None]})],
        [((i,), {}) for i in range(100)],
        [(([1] * 17,), {})],  # a long list: cloudpickle's path
        [((_Point(3),), {})],  # a user's object: cloudpickle's path
        [((lambda: 1,), {})],  # only cloudpickle can
    ],
)
def test_arguments_pickle_to_the_same_bytes_either_way(items: list[tuple[tuple[object, ...], dict[str, object]]]) -> None:
    from async_ca_exec import serialize

    data = serialize.dumps_items(items, "call-1")
    assert data == serialize.dumps(items)  # the C pickler's bytes for plain values are cloudpickle's
    back = serialize.loads(data)
    assert len(back) == len(items) and type(back[0][0][0]) is type(items[0][0][0])


def test_an_unpicklable_argument_still_names_itself() -> None:
    import threading

    from async_ca_exec import serialize
    from async_ca_exec.errors import SerializationError

    with pytest.raises(SerializationError, match=r"positional argument 1 of call call-2 is a _thread\.lock"):
        serialize.dumps_items([((1, threading.Lock()), {})], "call-2")
