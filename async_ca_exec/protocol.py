"""Wire format shared by the client and the container server.

Everything that crosses the network between :class:`~async_ca_exec.AsyncExecutor` and a
replica is defined here, and nothing else: the container server imports this module (and
only this module) from the client package, so the two ends can never disagree.

Request (``POST /v1/invoke``)::

    headers  X-Acx-Timestamp, X-Acx-Call-Id, X-Acx-Signature (HMAC-SHA256, see sign())
    body     envelope = fixed header | JSON header | function pickle | items pickle

The items pickle is one pickle of ``[(args, kwargs), ...]``: a single call is a batch of one.
The server never unpickles anything itself; it verifies the signature and the envelope's
structure and hands the bytes to a worker process.

Response (``200``) is a stream of frames ``<type:u8><length:u32><payload>``: heartbeats
while calls run, logs, outcomes (results or errors for a range of items) and a final END
frame, so a client can tell a complete stream from a cut one.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import re
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

PROTOCOL_VERSION = 2

INVOKE_PATH = "/v1/invoke"
HEALTH_PATH = "/v1/health"
#: Liveness: 200 while the server's event loop answers (draining included), 503 only when its
#: workers cannot start (a restart may help). Readiness is HEALTH_PATH (200 once workers are up).
LIVE_PATH = "/v1/live"
META_PATH = "/v1/meta"

H_TIMESTAMP = "X-Acx-Timestamp"
H_CALL_ID = "X-Acx-Call-Id"
H_SIGNATURE = "X-Acx-Signature"
H_HEAD_SIGNATURE = "X-Acx-Head-Signature"
H_ATTEMPT = "X-Acx-Attempt"
H_REPLICA = "X-Acx-Replica"

REQUEST_CONTENT_TYPE = "application/vnd.acx.envelope"
RESPONSE_CONTENT_TYPE = "application/vnd.acx.frames"

#: Largest request body a server accepts unless configured otherwise (bytes).
DEFAULT_MAX_BODY = 256 * 1024 * 1024
#: Largest single response frame a client accepts unless configured otherwise (bytes).
DEFAULT_MAX_FRAME = 1024 * 1024 * 1024
#: Largest JSON header inside an envelope (bytes).
MAX_JSON_HEADER = 64 * 1024
#: Longest call id accepted.
MAX_CALL_ID = 128
#: Most items one request may carry.
MAX_BATCH = 100_000
#: Functions pickled larger than this travel by reference: once per replica, then by hash.
FN_INLINE_LIMIT = 64 * 1024
#: Error code of a 409 answer: the replica does not have the function; send it along.
UNKNOWN_FUNCTION = "unknown-function"
#: Error code of a 409 answer: this exact request (call id and attempt) was received before.
REPLAYED = "replayed"
#: Signatures older or newer than this (seconds) are refused, which bounds replays.
DEFAULT_SIGNATURE_WINDOW = 300.0
#: Seconds between heartbeat frames while a call runs.
DEFAULT_HEARTBEAT = 5.0

# Regular expressions test a str faster than a set of its characters does.
_CALL_ID_MATCH = re.compile("[a-zA-Z0-9_.:-]*").fullmatch
_HEX_MATCH = re.compile("[0-9a-f]*").fullmatch

# --------------------------------------------------------------------------------------
# errors


class ProtocolError(ValueError):
    """Bytes that do not follow this protocol. ``status`` is the HTTP status to answer with."""

    status = 400


class SignatureError(ProtocolError):
    """A request that is unsigned, signed with another key, stale or tampered with."""

    status = 401


class PayloadTooLarge(ProtocolError):
    status = 413


# --------------------------------------------------------------------------------------
# signing


def body_digest(body: bytes | bytearray | memoryview) -> str:
    return _sha256(body).hexdigest()


_sha256 = hashlib.sha256
_TRANS_5C = bytes(x ^ 0x5C for x in range(256))
_TRANS_36 = bytes(x ^ 0x36 for x in range(256))
#: Per key, SHA-256 states that have hashed its inner and outer HMAC pads (RFC 2104): copying
#: them costs less than keying an HMAC for every request. A handful of keys at most.
_HMAC_PADS: dict[bytes, tuple[Any, Any]] = {}


def _hmac_sha256_hex(key: bytes, msg: bytes) -> str:
    """``hmac.new(key, msg, hashlib.sha256).hexdigest()``, from precomputed pad states."""
    pads = _HMAC_PADS.get(key) if type(key) is bytes else None
    if pads is None:
        if type(key) is not bytes:  # bytearray, memoryview: as hmac.new takes them, uncached
            return hmac.new(key, msg, _sha256).hexdigest()
        padded = (_sha256(key).digest() if len(key) > 64 else key).ljust(64, b"\0")  # 64: SHA-256's block size
        pads = (_sha256(padded.translate(_TRANS_36)), _sha256(padded.translate(_TRANS_5C)))
        if len(_HMAC_PADS) >= 16:
            _HMAC_PADS.clear()
        _HMAC_PADS[key] = pads
    inner = pads[0].copy()
    inner.update(msg)
    outer = pads[1].copy()
    outer.update(inner.digest())
    return outer.hexdigest()  # type: ignore[no-any-return]


def sign(
    key: bytes, method: str, path: str, timestamp: str, call_id: str, body: bytes | bytearray | memoryview,
    attempt: int = 0,
) -> str:  # fmt: skip
    """HMAC-SHA256 over method, path, timestamp, call id, attempt and the body's SHA-256, as hex.

    Calls (POST) sign their attempt; GETs are signed as in protocol 1, so a client can always
    read /v1/meta, learn a runtime's protocol version and say it differs (not "wrong key").
    """
    m = method.upper()
    att = "" if m == "GET" else f"{attempt}\n"
    return _hmac_sha256_hex(key, f"{m}\n{path}\n{timestamp}\n{call_id}\n{att}{body_digest(body)}".encode())


def sign_head(key: bytes, method: str, path: str, timestamp: str, call_id: str, length: int, attempt: int = 0) -> str:
    """HMAC-SHA256 over what is known before the body is read (its length, not its digest)."""
    m = method.upper()
    att = "" if m == "GET" else f"{attempt}\n"  # (see sign())
    return _hmac_sha256_hex(key, f"acx-head\n{m}\n{path}\n{timestamp}\n{call_id}\n{att}{length}".encode())


def signed_headers(
    key: bytes, method: str, path: str, call_id: str, body: bytes | bytearray | memoryview, now: float | None = None,
    attempt: int = 0,
) -> dict[str, str]:  # fmt: skip
    """The headers that authenticate a request.

    Two signatures: one over the whole request (body digest included), and one over its
    headers and body length, which a server checks before reading a body of that length.
    ``attempt`` numbers the sends of one call id (a retry is a new attempt), so a server can
    refuse a request it has already received (a replay) without refusing retries.
    """
    ts = f"{time.time() if now is None else now:.3f}"
    return {
        H_TIMESTAMP: ts,
        H_CALL_ID: call_id,
        H_ATTEMPT: str(attempt),
        H_HEAD_SIGNATURE: sign_head(key, method, path, ts, call_id, len(body), attempt),
        H_SIGNATURE: sign(key, method, path, ts, call_id, body, attempt),
    }


def attempt_of(headers: Any) -> int:
    """The signed attempt number of a request (0 when the header is absent)."""
    raw = headers.get(H_ATTEMPT)
    if not raw or raw == "0":  # the first send
        return 0
    if len(raw) > 6 or not raw.isdigit() or not raw.isascii():
        raise SignatureError(f"header {H_ATTEMPT} must be a small non-negative integer")
    return int(raw)


def verify_head(
    key: bytes,
    method: str,
    path: str,
    headers: Any,
    length: int | None,
    *,
    window: float = DEFAULT_SIGNATURE_WINDOW,
    now: float | None = None,
) -> None:
    """Check the timestamp and the head signature, before any byte of the body is read."""
    ts = headers.get(H_TIMESTAMP)
    check_fresh(ts, window=window, now=now)
    call_id = headers.get(H_CALL_ID)
    sig = headers.get(H_HEAD_SIGNATURE)
    if not call_id or not sig:
        raise SignatureError(f"unsigned request: headers {H_CALL_ID} and {H_HEAD_SIGNATURE} are required")
    if length is None:
        raise SignatureError("a signed request needs a Content-Length (chunked bodies are not accepted)")
    expected = sign_head(key, method, path, ts, call_id, length, attempt_of(headers))
    _check_signature(expected, sig)


def _check_signature(expected: str, sig: Any) -> None:
    """Compare a computed signature with a header's in constant time; SignatureError if they differ."""
    if type(sig) is str and sig.isascii():  # compare_digest takes an ASCII str as it takes bytes
        same = hmac.compare_digest(expected, sig)
    else:
        same = hmac.compare_digest(expected.encode(), sig.encode("ascii", "replace"))
    if not same:
        raise SignatureError("signature mismatch: the request was signed with another key or changed in transit")


def check_call_id(call_id: str) -> None:
    if call_id and len(call_id) <= MAX_CALL_ID and _CALL_ID_MATCH(call_id):
        return
    raise ProtocolError(f"call id must be 1..{MAX_CALL_ID} characters from [A-Za-z0-9-_.:], got {call_id[:40]!r}")


def check_fresh(timestamp: str | None, *, window: float = DEFAULT_SIGNATURE_WINDOW, now: float | None = None) -> None:
    """Refuse a missing, malformed or stale timestamp before reading the body."""
    if not timestamp:
        raise SignatureError(f"unsigned request: header {H_TIMESTAMP} is missing")
    try:
        ts = float(timestamp)
    except ValueError:
        raise SignatureError(f"header {H_TIMESTAMP} is not a number") from None
    if not math.isfinite(ts):
        raise SignatureError(f"header {H_TIMESTAMP} is not a finite number")
    skew = (time.time() if now is None else now) - ts
    if abs(skew) > window:
        raise SignatureError(
            f"stale signature: timestamp is {skew:+.0f} s away from the server clock "
            f"(allowed ±{window:.0f} s); check the client's clock"
        )


def verify(
    key: bytes,
    method: str,
    path: str,
    headers: Any,
    body: bytes | bytearray | memoryview,
    *,
    window: float = DEFAULT_SIGNATURE_WINDOW,
    now: float | None = None,
) -> str:
    """Check a request's signature; return its call id or raise :class:`SignatureError`.

    ``headers`` is any mapping with ``.get`` (aiohttp's CIMultiDict, a dict).
    """
    ts = headers.get(H_TIMESTAMP)
    check_fresh(ts, window=window, now=now)
    call_id = headers.get(H_CALL_ID)
    sig = headers.get(H_SIGNATURE)
    if not call_id or not sig:
        raise SignatureError(f"unsigned request: headers {H_CALL_ID} and {H_SIGNATURE} are required")
    expected = sign(key, method, path, ts, call_id, body, attempt_of(headers))
    _check_signature(expected, sig)
    try:
        check_call_id(call_id)
    except ProtocolError as exc:
        raise SignatureError(str(exc)) from None
    return str(call_id)


# --------------------------------------------------------------------------------------
# request envelope

_MAGIC = b"ACXQ"
# magic, version, flags, reserved, json header length, function length, items length
_ENVELOPE = struct.Struct("<4sBBHIII")
ENVELOPE_FIXED = _ENVELOPE.size


@dataclass(frozen=True)
class Invocation:
    """One decoded request: a function (pickled; empty when sent by reference to its hash),
    ``n`` items (pickled together) and options."""

    call_id: str
    n: int
    fn_hash: str
    fn: memoryview
    items: memoryview
    timeout: float
    skip: tuple[int, ...]
    header: dict[str, Any]


def _invocation(
    call_id: str, n: int, fn_hash: str, fn: memoryview, items: memoryview, timeout: float, skip: tuple[int, ...],
    header: dict[str, Any],
) -> Invocation:  # fmt: skip
    """``Invocation(...)`` in a third of the time: a frozen dataclass's ``__init__`` sets each
    field through ``object.__setattr__``."""
    inv = _object_new(Invocation)
    d = inv.__dict__
    d["call_id"] = call_id
    d["n"] = n
    d["fn_hash"] = fn_hash
    d["fn"] = fn
    d["items"] = items
    d["timeout"] = timeout
    d["skip"] = skip
    d["header"] = header
    return inv


_object_new = object.__new__
#: json.dumps(obj, separators=(",", ":")) builds an encoder per call; this one is built once.
_JSON_COMPACT = json.JSONEncoder(separators=(",", ":"))
_json_string = json.encoder.encode_basestring_ascii  # how that encoder writes a str (ensure_ascii)
#: What json.loads runs (JSONDecoder.decode, less its checks around it).
_json_scan: Callable[[str, int], tuple[Any, int]] = json.JSONDecoder().scan_once  # type: ignore[attr-defined]
_INF = math.inf
_finite = math.isfinite


def _json_object(data: bytes | bytearray | memoryview) -> dict[str, Any] | None:
    """The JSON object ``data`` holds, as ``json.loads(bytes(data))`` gives it, when ``data`` is
    plain UTF-8 starting with ``{`` and without trailing whitespace (what this module writes);
    None for anything else (also for anything json.loads refuses): the caller then takes
    json.loads's path, so odd bytes get exactly its answer or its error."""
    try:
        s = str(data, "utf-8", "surrogatepass")
        obj, end = _json_scan(s, 0)
    except (ValueError, StopIteration):
        return None
    # s starts with a value (not a BOM or whitespace), so json.loads would read it as UTF-8 too
    return obj if end == len(s) and type(obj) is dict else None


def _json_dict(data: bytes | bytearray | memoryview, what: str) -> dict[str, Any]:
    """The JSON object in ``data``; ProtocolError naming ``what`` if it is not valid JSON or not an object."""
    obj = _json_object(data)
    if obj is None:
        try:
            obj = json.loads(bytes(data))
        except (UnicodeDecodeError, ValueError) as exc:
            raise ProtocolError(f"{what} is not valid JSON: {exc}") from None
        if not isinstance(obj, dict):
            raise ProtocolError(f"{what} must be an object")
    return obj


def encode_invocation(
    *, call_id: str, n: int, fn: bytes, fn_hash: str, items: bytes, timeout: float, extra: dict[str, Any] | None = None
) -> bytes:
    """Build a request body. ``fn_hash`` is ``sha256(fn).hexdigest()``, computed once per job."""
    if (
        not extra
        and type(call_id) is str
        and type(fn_hash) is str
        and type(n) is int
        and type(timeout) is float
        and _finite(timeout)
    ):
        # The usual header, byte for byte as the encoder below writes it: a str through
        # encode_basestring_ascii, an int or a finite float as its repr.
        hj = f'{{"id":{_json_string(call_id)},"n":{n!r},"fn":{_json_string(fn_hash)},"timeout":{timeout!r}}}'.encode()
    else:
        header: dict[str, Any] = {"id": call_id, "n": n, "fn": fn_hash, "timeout": timeout}
        if extra:
            header.update(extra)
        hj = _JSON_COMPACT.encode(header).encode()
    return b"".join((_ENVELOPE.pack(_MAGIC, PROTOCOL_VERSION, 0, 0, len(hj), len(fn), len(items)), hj, fn, items))


def decode_invocation(body: bytes | bytearray | memoryview, *, max_timeout: float | None = None) -> Invocation:
    """Parse a verified request body, checking every length and field; never unpickles."""
    mv = memoryview(body)
    size = len(mv)
    if size < ENVELOPE_FIXED:
        raise ProtocolError(f"envelope truncated: {size} bytes, the fixed header alone is {ENVELOPE_FIXED}")
    magic, version, _flags, _res, hlen, flen, ilen = _ENVELOPE.unpack_from(mv)
    if magic != _MAGIC:
        raise ProtocolError("not an async_ca_exec envelope (bad magic bytes)")
    if version != PROTOCOL_VERSION:
        raise ProtocolError(
            f"protocol version {version} is not supported by this server (speaks {PROTOCOL_VERSION}); "
            "use a client and runtime of the same async_ca_exec release"
        )
    if hlen > MAX_JSON_HEADER:
        raise ProtocolError(f"JSON header of {hlen} bytes exceeds the limit of {MAX_JSON_HEADER}")
    if ENVELOPE_FIXED + hlen + flen + ilen != size:
        raise ProtocolError(f"envelope lengths ({ENVELOPE_FIXED}+{hlen}+{flen}+{ilen}) do not add up to the body size {size}")
    off = ENVELOPE_FIXED + hlen
    header = _json_dict(mv[ENVELOPE_FIXED:off], "JSON header")
    # Values come from JSON: exact types (the only int subclass JSON gives is bool)
    call_id = header.get("id")
    n = header.get("n")
    fn_hash = header.get("fn")
    timeout = header.get("timeout")
    if type(call_id) is not str:
        raise ProtocolError("header field 'id' must be a string")
    check_call_id(call_id)
    if type(n) is not int or not 1 <= n <= MAX_BATCH:
        raise ProtocolError(f"header field 'n' must be an integer in 1..{MAX_BATCH}")
    if type(fn_hash) is not str or len(fn_hash) != 64 or not _HEX_MATCH(fn_hash):
        raise ProtocolError("header field 'fn' must be a SHA-256 hex digest")
    if (type(timeout) is not float and type(timeout) is not int) or not (0 < timeout < _INF):
        raise ProtocolError("header field 'timeout' must be a positive number of seconds")
    if max_timeout is not None and timeout > max_timeout:
        raise ProtocolError(
            f"timeout {timeout:g} s exceeds this runtime's maximum of {max_timeout:g} s; "
            "lower the call timeout or redeploy the runtime with a larger runtime_timeout"
        )
    if len(header) == 4:  # id, n, fn and timeout (all checked present) and nothing else: no options to check
        skip: tuple[int, ...] = ()
        if not ilen:
            raise ProtocolError("the envelope carries no items and no items_url")
    else:
        skip = _skip_and_options(header, n, ilen)
    fn = mv[off : off + flen]
    off += flen
    items = mv[off : off + ilen]
    if flen and _sha256(fn).hexdigest() != fn_hash:
        raise ProtocolError("function bytes do not match header field 'fn' (their SHA-256)")
    return _invocation(call_id, n, fn_hash, fn, items, float(timeout), skip, header)


def _skip_and_options(header: dict[str, Any], n: int, ilen: int) -> tuple[int, ...]:
    """Check an envelope header's optional fields; return its items to skip, sorted."""
    skip: tuple[int, ...] = ()
    if "skip" in header:
        indices = header["skip"]
        if not isinstance(indices, (list, tuple)) or not all(
            isinstance(i, int) and not isinstance(i, bool) and 0 <= i < n for i in indices
        ):
            raise ProtocolError("header field 'skip' must be a list of item indices")
        skip = tuple(sorted(set(indices)))
        if len(skip) >= n:
            raise ProtocolError("header field 'skip' leaves no item to run")
    # flen == 0: the function by reference (its hash), for a replica that has it cached
    items_url = header.get("items_url")
    if ilen == 0 and not items_url:
        raise ProtocolError("the envelope carries no items and no items_url")
    for name in ("items_url", "fn_url", "out_url"):
        url = header.get(name)
        if url is not None and (not isinstance(url, str) or not url.startswith(("https://", "http://"))):
            raise ProtocolError(f"header field {name!r} must be an http(s) URL")
    for name in ("items_size", "inline_limit"):
        v = header.get(name)
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 0):
            raise ProtocolError(f"header field {name!r} must be a non-negative integer")
    if header.get("out_url") and not isinstance(header.get("out_prefix"), str):
        raise ProtocolError("header field 'out_prefix' must name where results go")
    return skip


# --------------------------------------------------------------------------------------
# response frames

F_HEARTBEAT = 1
F_LOG = 2
F_OUTCOME = 3
F_END = 4
#: An outcome too large for the response, written to Blob: JSON {"first", "n", "blob", "size", "sha256"}.
F_REF = 5
FRAME_TYPES = frozenset((F_HEARTBEAT, F_LOG, F_OUTCOME, F_END, F_REF))

_FRAME = struct.Struct("<BI")
FRAME_HEADER = _FRAME.size
_U32 = struct.Struct("<I")
_LOG = struct.Struct("<IB")
STDOUT = 1
STDERR = 2

HEARTBEAT_FRAME = _FRAME.pack(F_HEARTBEAT, 0)
END_FRAME = _FRAME.pack(F_END, 0)


def frame(ftype: int, payload: bytes | bytearray | memoryview = b"") -> bytes:
    return _FRAME.pack(ftype, len(payload)) + bytes(payload)


def frame_header(ftype: int, length: int) -> bytes:
    return _FRAME.pack(ftype, length)


def parse_frame_header(hdr: bytes | bytearray | memoryview, *, max_frame: int = DEFAULT_MAX_FRAME) -> tuple[int, int]:
    ftype, length = _FRAME.unpack_from(hdr)
    if ftype not in FRAME_TYPES:
        raise ProtocolError(f"unknown frame type {ftype}")
    if length > max_frame:
        raise PayloadTooLarge(
            f"frame of {length} bytes exceeds the client's limit of {max_frame}; raise max_frame_bytes or return smaller results"
        )
    return ftype, length


def iter_frames(buf: bytes | bytearray | memoryview, *, max_frame: int = DEFAULT_MAX_FRAME) -> Iterator[tuple[int, memoryview]]:
    """Split a complete response body into frames; raises ProtocolError on truncation."""
    mv = memoryview(buf)
    off = 0
    end = len(mv)
    while off < end:
        if end - off < FRAME_HEADER:
            raise ProtocolError(f"truncated frame header at byte {off}")
        ftype, length = _FRAME.unpack_from(mv, off)
        if ftype not in FRAME_TYPES or length > max_frame:
            parse_frame_header(mv[off : off + FRAME_HEADER], max_frame=max_frame)  # raises the error
        off += FRAME_HEADER
        if end - off < length:
            raise ProtocolError(f"truncated frame at byte {off}: {length} bytes announced, {end - off} present")
        yield ftype, mv[off : off + length]
        off += length


def encode_log(index: int, stream: int, text: str | bytes | memoryview) -> bytes:
    data = text.encode("utf-8", "replace") if isinstance(text, str) else bytes(text)
    return _FRAME.pack(F_LOG, _LOG.size + len(data)) + _LOG.pack(index, stream) + data


def decode_log(payload: memoryview) -> tuple[int, int, str]:
    if len(payload) < _LOG.size:
        raise ProtocolError("log frame too short")
    index, stream = _LOG.unpack_from(payload)
    if stream not in (STDOUT, STDERR):
        raise ProtocolError(f"log frame names unknown stream {stream}")
    return index, stream, bytes(payload[_LOG.size :]).decode("utf-8", "replace")


# An outcome payload is <meta length:u32><meta JSON><blob>. The meta says which items it covers
# ("first", "n") and carries per-item stats and error descriptions; the blob is a pickle of
# (values, {index: pickled exception}) produced by the worker, relayed by the server untouched.


def encode_outcome_payload(meta: dict[str, Any], blob: bytes) -> bytes:
    mj = _JSON_COMPACT.encode(meta).encode()
    return _U32.pack(len(mj)) + mj + blob


def decode_outcome_payload(payload: memoryview) -> tuple[dict[str, Any], memoryview]:
    if len(payload) < 4:
        raise ProtocolError("outcome frame too short")
    (mlen,) = _U32.unpack_from(payload)
    if 4 + mlen > len(payload):
        raise ProtocolError("outcome frame meta overruns the frame")
    meta = _json_dict(payload[4 : 4 + mlen], "outcome meta")
    first, n = meta.get("first"), meta.get("n")
    if not isinstance(first, int) or not isinstance(n, int) or first < 0 or n < 1:
        raise ProtocolError("outcome meta needs integer 'first' >= 0 and 'n' >= 1")
    return meta, payload[4 + mlen :]


# Error kinds in an outcome's meta["errors"][index]["kind"]
ERR_USER = "user"  # the function raised
ERR_TIMEOUT = "timeout"  # the call exceeded its timeout and its worker was killed
ERR_CRASHED = "crashed"  # the worker process died while running the call
ERR_SERIALIZATION = "serialization"  # arguments or result could not be (un)pickled
ERR_INTERNAL = "internal"  # the runtime failed in a way that is not the call's fault
ERR_STORAGE = "storage"  # the runtime could not read or write the call's blobs
ERROR_KINDS = frozenset((ERR_USER, ERR_TIMEOUT, ERR_CRASHED, ERR_SERIALIZATION, ERR_INTERNAL, ERR_STORAGE))


def encode_ref(first: int, n: int, blob: str, size: int, sha256: str) -> bytes:
    doc = {"first": first, "n": n, "blob": blob, "size": size, "sha256": sha256}
    return frame(F_REF, _JSON_COMPACT.encode(doc).encode())


def decode_ref(payload: memoryview) -> dict[str, Any]:
    try:
        ref = json.loads(bytes(payload))
    except (UnicodeDecodeError, ValueError) as exc:
        raise ProtocolError(f"reference frame is not valid JSON: {exc}") from None
    if not (
        isinstance(ref, dict)
        and isinstance(ref.get("first"), int)
        and isinstance(ref.get("n"), int)
        and isinstance(ref.get("blob"), str)
        and isinstance(ref.get("size"), int)
        and isinstance(ref.get("sha256"), str)
    ):
        raise ProtocolError("reference frame needs integer 'first', 'n', 'size', a 'blob' name and its 'sha256'")
    return ref
