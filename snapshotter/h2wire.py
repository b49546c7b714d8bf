"""HTTP/2 on the wire for our gRPC server: frame constants and builders, the limits we enforce on
what a client sends, HPACK in both directions, and the gRPC header values (RFC 9113, RFC 7541 and
gRPC's "PROTOCOL-HTTP2" spec).

Nothing here holds connection state except `HeaderDecoder`, the one HPACK decoder a connection
has. The protocol (`snapshotter.h2conn`) parses frames with the structs below and raises
`H2ConnectionError` for anything that ends a connection; this module decides what is a well-formed
request (`parse_request_head`), so a malformed one resets only its stream.

Why hand-written and not the `h2` library: a 32 KiB `Read` costs ~2.9x the server CPU on h2's public
API (bench/RESULTS.md), and containerd makes thousands of them per pull. The parts of HTTP/2 a gRPC
server over a unix socket needs are few; the hostile tests (tests/snapshotter/
test_h2server_hostile.py) hold them to the RFC.

HPACK, both ways, kept cheap:
- Our own header blocks are constant bytes built from static-table indices and literals without
  indexing, so the peer's dynamic table (and its SETTINGS_HEADER_TABLE_SIZE) never matters.
- `HeaderDecoder` decodes with the `hpack` library and caches the parsed request head per header
  block. A block is cached only when it leaves the dynamic table untouched (indexed fields and
  literals without indexing); the key is the block's bytes, valid for one "table generation",
  which advances whenever a block that could touch the table is decoded. Indexed lookups are pure
  reads, so an identical block under an unchanged table decodes to the same header list. grpc-go
  indexes every header it sends, so from the second RPC of a method on its request header blocks
  are all-indexed and hit the cache.
"""

from __future__ import annotations

import base64
import re
import struct
from collections.abc import Iterable, Sequence
from typing import Any

import grpc
import hpack

__all__ = [
    "PREFACE",
    "H2ConnectionError",
    "HeaderDecoder",
    "RequestHead",
    "parse_request_head",
    "parse_timeout",
    "percent_encode",
    "status_block",
    "table_neutral",
]

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

# Frame types (RFC 9113 6)
T_DATA, T_HEADERS, T_PRIORITY, T_RST_STREAM, T_SETTINGS = 0, 1, 2, 3, 4
T_PUSH_PROMISE, T_PING, T_GOAWAY, T_WINDOW_UPDATE, T_CONTINUATION = 5, 6, 7, 8, 9

# Flags
F_END_STREAM = 0x1
F_ACK = 0x1
F_END_HEADERS = 0x4
F_PADDED = 0x8
F_PRIORITY = 0x20

# Error codes (RFC 9113 7)
E_NO_ERROR, E_PROTOCOL, E_INTERNAL, E_FLOW_CONTROL = 0x0, 0x1, 0x2, 0x3
E_STREAM_CLOSED, E_FRAME_SIZE, E_REFUSED_STREAM, E_CANCEL, E_COMPRESSION = 0x5, 0x6, 0x7, 0x8, 0x9
E_ENHANCE_YOUR_CALM = 0xB

# Settings (RFC 9113 6.5.2)
S_HEADER_TABLE_SIZE, S_ENABLE_PUSH, S_MAX_CONCURRENT_STREAMS = 0x1, 0x2, 0x3
S_INITIAL_WINDOW_SIZE, S_MAX_FRAME_SIZE, S_MAX_HEADER_LIST_SIZE = 0x4, 0x5, 0x6

MAX_WINDOW = 2**31 - 1
DEFAULT_WINDOW = 65535
DEFAULT_MAX_FRAME = 16384
OUR_MAX_FRAME = 2**24 - 1  # the largest frame a peer may send us (SETTINGS_MAX_FRAME_SIZE)

# Limits on what a client makes us hold or do for one header block. grpc-go's request blocks are a
# few hundred bytes; 64 KiB is also what we advertise as SETTINGS_MAX_HEADER_LIST_SIZE. Beyond
# either bound the connection ends with ENHANCE_YOUR_CALM before anything is decoded.
MAX_HEADER_BLOCK = 64 * 1024  # encoded bytes of HEADERS + CONTINUATION fragments, joined
MAX_CONTINUATIONS = 64  # CONTINUATION frames after one HEADERS (empty ones cost work too)
# Frames of kinds we only glance at (SETTINGS, GOAWAY) larger than this end the connection; unknown
# extension frames larger than this are skipped as they stream in, never gathered whole.
MAX_CONTROL_FRAME = 64 * 1024
# Response bytes waiting for the peer's send windows on one connection above which no new handler
# starts (snapshotter.h2conn): what a peer that never reads can make us hold, beyond one message
# per running handler.
PENDING_LIMIT = 4 * 1024 * 1024

FH = struct.Struct(">IBI")  # frame header: (length << 8 | type), flags, stream id
DATA_MSG = struct.Struct(">IBIBI")  # DATA frame header + gRPC message prefix, one pack
MSG_PREFIX = struct.Struct(">BI")  # gRPC message prefix: compressed flag, length
U32 = struct.Struct(">I")
U32x2 = struct.Struct(">II")
SETTING = struct.Struct(">HI")
PRIORITY_FIELDS = 5  # stream dependency (4) + weight (1)


class H2ConnectionError(Exception):
    """A connection error (RFC 9113 5.4.1): the connection ends with GOAWAY(`code`)."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


# ------------------------------------------------------------------------------------------ frames


def window_update(sid: int, increment: int) -> bytes:
    """WINDOW_UPDATE: hand `increment` bytes back to the peer's send window (stream 0: the connection's)."""
    return FH.pack(4 << 8 | T_WINDOW_UPDATE, 0, sid) + U32.pack(increment)


def rst_stream(sid: int, code: int) -> bytes:
    """RST_STREAM: a stream error; the connection goes on."""
    return FH.pack(4 << 8 | T_RST_STREAM, 0, sid) + U32.pack(code)


def goaway(last_sid: int, code: int) -> bytes:
    """GOAWAY: no streams after `last_sid` will be served; with an error code, the connection ends."""
    return FH.pack(8 << 8 | T_GOAWAY, 0, 0) + U32x2.pack(last_sid, code)


def settings(values: Iterable[tuple[int, int]]) -> bytes:
    """Our SETTINGS frame (the first thing we send on a connection)."""
    payload = b"".join(SETTING.pack(k, v) for k, v in values)
    return FH.pack(len(payload) << 8 | T_SETTINGS, 0, 0) + payload


SETTINGS_ACK = FH.pack(T_SETTINGS, F_ACK, 0)


def header_frames(sid: int, block: bytes, end_stream: bool, max_frame: int) -> list[bytes]:
    """HEADERS (+ CONTINUATION) frames carrying `block`, each within the peer's max frame size."""
    flags = F_END_STREAM if end_stream else 0
    if len(block) <= max_frame:
        return [FH.pack(len(block) << 8 | T_HEADERS, flags | F_END_HEADERS, sid) + block]
    first, rest = block[:max_frame], block[max_frame:]
    out = [FH.pack(len(first) << 8 | T_HEADERS, flags, sid) + first]
    while rest:
        chunk, rest = rest[:max_frame], rest[max_frame:]
        out.append(FH.pack(len(chunk) << 8 | T_CONTINUATION, 0 if rest else F_END_HEADERS, sid) + chunk)
    return out


# ------------------------------------------------------------------------------------------ HPACK out


def _hpack_int(value: int, prefix_bits: int, first: int = 0) -> bytes:
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes((first | value,))
    out = bytearray((first | limit,))
    value -= limit
    while value >= 128:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def literal(name: bytes, value: bytes) -> bytes:
    """Literal header field without indexing, new name, no Huffman coding (RFC 7541 6.2.2)."""
    return b"\x00" + _hpack_int(len(name), 7) + name + _hpack_int(len(value), 7) + value


def literal_indexed_name(index: int, value: bytes) -> bytes:
    """Literal header field without indexing, name from the static table."""
    return _hpack_int(index, 4) + _hpack_int(len(value), 7) + value


# ":status: 200" is static index 8; "content-type" is static index 31.
RESPONSE_HEADERS = b"\x88" + literal_indexed_name(31, b"application/grpc")
TRAILERS_OK = literal(b"grpc-status", b"0")
# Not POST or not a gRPC content type: HTTP 415 with a gRPC status, as grpc-go answers.
BAD_REQUEST = (
    literal_indexed_name(8, b"415")
    + literal(b"grpc-status", b"13")
    + literal(b"grpc-message", b"bad request")
)

_PCT_RE = re.compile(rb"[^\x20-\x24\x26-\x7e]")
_MAX_GRPC_MESSAGE = 8192  # keep trailers inside one modest header block


def percent_encode(message: str) -> bytes:
    """grpc-message encoding (gRPC HTTP/2 spec): UTF-8, then %XX for bytes outside 0x20-0x7E and '%'."""
    raw = message.encode("utf-8", "replace")
    return _PCT_RE.sub(lambda m: b"%%%02X" % m.group()[0], raw)


def metadata_field(key: str, value: Any) -> bytes:
    """One custom metadata entry as a header field: lower-case name, `-bin` values base64 (unpadded)."""
    k = key.lower()
    if k.endswith("-bin"):
        raw = value if isinstance(value, bytes | bytearray) else str(value).encode()
        v = base64.b64encode(raw).rstrip(b"=")
    else:
        v = value.encode() if isinstance(value, str) else bytes(value)
    return literal(k.encode(), v)


_CODE_NUM = {c: c.value[0] for c in grpc.StatusCode}


def status_block(
    code: grpc.StatusCode, details: str | None, trailing: Sequence[tuple[str, Any]] = ()
) -> bytes:
    """The trailer fields for a status: grpc-status, grpc-message (percent-encoded, bounded), metadata."""
    if code is grpc.StatusCode.OK and not details and not trailing:
        return TRAILERS_OK
    block = literal(b"grpc-status", str(_CODE_NUM[code]).encode())
    if details:
        encoded = percent_encode(details)
        if len(encoded) > _MAX_GRPC_MESSAGE:
            encoded = encoded[:_MAX_GRPC_MESSAGE]
            cut = encoded.rfind(b"%", len(encoded) - 2)
            if cut >= 0:  # never split a %XX escape
                encoded = encoded[:cut]
        block += literal(b"grpc-message", encoded)
    for key, value in trailing:
        block += metadata_field(key, value)
    return block


# ------------------------------------------------------------------------------------------ requests

_TIMEOUT_UNITS = {"H": 3600.0, "M": 60.0, "S": 1.0, "m": 1e-3, "u": 1e-6, "n": 1e-9}


def parse_timeout(value: str) -> float | None:
    """grpc-timeout: at most 8 digits and a unit; anything else is ignored (no deadline)."""
    unit = _TIMEOUT_UNITS.get(value[-1:])
    digits = value[:-1]
    if unit is None or not digits.isdigit() or len(digits) > 8:
        return None
    return int(digits) * unit


_SKIP_METADATA = frozenset(
    (b"content-type", b"te", b"grpc-timeout", b"grpc-encoding", b"grpc-accept-encoding")
)
_REQUEST_PSEUDO = frozenset((b":method", b":scheme", b":path", b":authority"))
_REQUIRED_PSEUDO = frozenset((b":method", b":scheme", b":path"))
_CONNECTION_SPECIFIC = frozenset(
    (b"connection", b"proxy-connection", b"keep-alive", b"transfer-encoding", b"upgrade")
)
_VALUE_BAD = re.compile(rb"[\x00\r\n]|^[ \t]|[ \t]$")
_NAME_BAD = re.compile(rb"[^!#$%&'*+\-.^_`|~0-9a-z:]")  # RFC 9110 token chars, lower case (RFC 9113 8.2.1)


class RequestHead:
    """What the server needs from a request's header block, parsed once per distinct block."""

    __slots__ = ("path", "timeout", "ok", "malformed", "metadata")

    def __init__(
        self,
        path: str,
        timeout: float | None,
        ok: bool,
        metadata: tuple[tuple[str, str], ...],
        malformed: bool = False,
    ) -> None:
        self.path = path
        self.timeout = timeout
        self.ok = ok  # POST with a gRPC content type: otherwise HTTP 415
        self.malformed = malformed  # not a well-formed HTTP/2 request: RST_STREAM(PROTOCOL_ERROR)
        self.metadata = metadata


MALFORMED = RequestHead("", None, False, (), malformed=True)


def parse_request_head(headers: Iterable[tuple[bytes, bytes]]) -> RequestHead:
    """Read :path, :method, content-type, grpc-timeout and the custom metadata from decoded headers,
    checking the request is well-formed HTTP/2 (RFC 9113 8.2-8.3): lower-case token names,
    pseudo-headers first, known and not repeated, :method/:scheme/:path present, no
    connection-specific fields, `te` only "trailers", no NUL/CR/LF or edge whitespace in values."""
    path = ""
    timeout = None
    ctype_ok = False
    method_ok = False
    meta = []
    seen: set[bytes] = set()
    regular = False
    for name, value in headers:
        if not name or _NAME_BAD.search(name) is not None or _VALUE_BAD.search(value) is not None:
            return MALFORMED
        if name[:1] == b":":
            if regular or name not in _REQUEST_PSEUDO or name in seen:
                return MALFORMED
            seen.add(name)
            if name == b":path":
                path = value.decode("utf-8", "replace")
            elif name == b":method":
                method_ok = value == b"POST"
            continue
        if b":" in name:
            return MALFORMED
        regular = True
        if name in _CONNECTION_SPECIFIC or (name == b"te" and value != b"trailers"):
            return MALFORMED
        if name == b"content-type":
            ctype_ok = value.startswith(b"application/grpc")
        elif name == b"grpc-timeout":
            timeout = parse_timeout(value.decode("ascii", "replace"))
        elif name not in _SKIP_METADATA:
            meta.append((name.decode("ascii"), value.decode("utf-8", "replace")))
    if not _REQUIRED_PSEUDO <= seen or not path:
        return MALFORMED
    return RequestHead(path, timeout, ctype_ok and method_ok, tuple(meta))


# ------------------------------------------------------------------------------------------ HPACK in


def table_neutral(block: bytes) -> bool:
    """True when decoding `block` cannot change the HPACK dynamic table.

    That holds for blocks made only of indexed fields (RFC 7541 6.1) and literals without indexing /
    never indexed (6.2.2, 6.2.3); a literal with incremental indexing (6.2.1) or a dynamic table size
    update (6.3) disqualifies the block. Malformed input returns False (the decoder reports it)."""
    i, n = 0, len(block)
    try:
        while i < n:
            b = block[i]
            if b & 0x80:  # indexed field, 7-bit prefix integer
                i += 1
                if b & 0x7F == 0x7F:
                    while block[i] & 0x80:
                        i += 1
                    i += 1
                continue
            if b & 0xE0:  # 0x40: incremental indexing; 0x20: size update
                return False
            i += 1  # literal without indexing / never indexed, 4-bit name index
            if b & 0x0F == 0x0F:
                while block[i] & 0x80:
                    i += 1
                i += 1
            strings = 1 if b & 0x0F else 2
            for _ in range(strings):
                ln = block[i] & 0x7F
                i += 1
                if ln == 0x7F:
                    shift = 0
                    while True:
                        c = block[i]
                        i += 1
                        ln += (c & 0x7F) << shift
                        shift += 7
                        if not c & 0x80:
                            break
                i += ln
        return i == n
    except IndexError:
        return False


_CACHE_ENTRIES = 256


class HeaderDecoder:
    """A connection's HPACK decoder, returning the parsed `RequestHead` of each header block.

    Every block is decoded (that keeps the dynamic table in step with the peer's encoder), except a
    table-neutral block seen before under the same table generation, whose head is cached (module
    docstring). Errors are connection errors: COMPRESSION_ERROR for a block the decoder cannot
    read (its state is unknown from then on), ENHANCE_YOUR_CALM for one that decodes to more than
    the header list size we advertised."""

    __slots__ = ("_decoder", "_cache", "_generation")

    def __init__(self, max_header_list_size: int = MAX_HEADER_BLOCK) -> None:
        self._decoder = hpack.Decoder(max_header_list_size)
        self._cache: dict[bytes, tuple[int, RequestHead]] = {}
        self._generation = 0

    @property
    def max_header_list_size(self) -> int:
        """The decoded size past which a block is refused: what we advertise in SETTINGS."""
        return self._decoder.max_header_list_size

    def head(self, block: bytes) -> RequestHead:
        """Decode one complete header block (HEADERS + CONTINUATIONs joined) into its request head."""
        hit = self._cache.get(block)
        if hit is not None and hit[0] == self._generation:
            return hit[1]
        try:
            headers = self._decoder.decode(block, raw=True)
        except hpack.OversizedHeaderListError as exc:
            raise H2ConnectionError(E_ENHANCE_YOUR_CALM, f"header list too large: {exc}") from exc
        except Exception as exc:  # any failure leaves the table unknown: the connection is done
            raise H2ConnectionError(E_COMPRESSION, f"hpack: {exc!r}") from exc
        head = parse_request_head(headers)  # raw=True: (bytes, bytes) pairs
        if table_neutral(block):
            if len(self._cache) >= _CACHE_ENTRIES:
                self._cache.clear()
            self._cache[block] = (self._generation, head)
        else:
            self._generation += 1
        return head
