"""Every bound on what a caller can make the daemon store, compute, send or keep open, in one place.

Why one module: the bounds of the two sides meet (a label stored through the content API is listed
back through it; a `/have` answer one node sends is what another node's client must accept), and a
bound set in one place and checked in another drifts apart. Each number says where it comes from;
`docs/limits.md` is the operator's table of them.

containerd's API (the gRPC side)
- A label's key and value together: at most `LABEL_MAX_BYTES` (containerd's `labels.Validate`,
  which its metadata store applies to every content and snapshot Info it writes).
- All labels of one object: at most `LABELS_MAX_BYTES` as encoded on the wire. containerd has no
  such bound, but a merge (`Update` with `labels.<key>` paths) can grow one object's labels without
  end, and an object's Info must always fit in one response message: the smallest the daemon may be
  configured to send is 128 KiB (`grpc.read_message_size` >= 64 KiB plus its 64 KiB envelope). The
  CRI labels of a snapshot take under 5 KiB; 64 KiB is 16 labels of containerd's largest size.
- Ingest refs and snapshot keys: at most `REF_MAX_BYTES`. containerd keeps a client's ref (and a
  snapshot key) as a bolt bucket key (`bbolt.MaxKeySize`, 32768 bytes) and hands the plugin
  `"<namespace>/<sequence>/<ref>"` (namespace: `identifiers`, at most 76 bytes; sequence: a uint64),
  so nothing longer can come from containerd. Snapshot keys are further bound by LMDB's key size
  (511 bytes), checked where a snapshot is created.

Records written by an older version that broke these bounds are still read: the labels over the
bounds are left out of what is reported (`kept_labels`) and an ingest with an over-long ref is left
out of listings, so one such record never breaks a listing of the whole store.
"""

from __future__ import annotations

from collections.abc import Mapping

from kernel.errors import InvalidArgument

KIB = 1 << 10
MIB = 1 << 20

# -- containerd's content and snapshots APIs -----------------------------------------------------

LABEL_MAX_BYTES = 4096  # containerd labels/validate.go: len(key) + len(value)
LABELS_MAX_BYTES = 64 * KIB  # all labels of one object, protobuf-encoded (see the module docstring)
BOLT_MAX_KEY = 32768  # go.etcd.io/bbolt MaxKeySize: containerd's own bound on a ref or a key
NAMESPACE_MAX = 76  # containerd identifiers/validate.go maxLength
REF_MAX_BYTES = NAMESPACE_MAX + 1 + 20 + 1 + BOLT_MAX_KEY  # "<namespace>/<uint64>/<ref>"
# What containerd's proxy client accepts in one message (defaults.DefaultMaxRecvMsgSize).
GRPC_MAX_SEND = 16 * MIB
# The payload of one streamed List response: small, so that a message is either under this or a
# single Info (itself under LABELS_MAX_BYTES plus its name), whatever the send limit is.
LIST_MESSAGE_BYTES = 64 * KIB
# An error message in a status is cut to this many characters: it often quotes the input.
ERROR_MESSAGE_MAX = 1024


def _varint_len(n: int) -> int:
    return max(1, (n.bit_length() + 6) // 7)


def _field_len(payload: int) -> int:
    """Bytes of one length-delimited protobuf field (field number < 16) carrying `payload` bytes."""
    return 1 + _varint_len(payload) + payload


def label_bytes(key: str, value: str) -> int:
    """The size containerd's `labels.Validate` measures: key and value in UTF-8 bytes."""
    return len(key.encode("utf-8", "surrogatepass")) + len(value.encode("utf-8", "surrogatepass"))


def labels_wire_bytes(labels: Mapping[str, str]) -> int:
    """The encoded size of `labels` as a protobuf map field (what they add to an Info message)."""
    total = 0
    for key, value in labels.items():
        k, v = len(key.encode("utf-8", "surrogatepass")), len(value.encode("utf-8", "surrogatepass"))
        total += _field_len(_field_len(k) + _field_len(v))
    return total


def check_labels(labels: Mapping[str, str], what: str) -> None:
    """InvalidArgument unless every label is within LABEL_MAX_BYTES and all within LABELS_MAX_BYTES.

    `what` names the object in the message (the key of a too-large label is cut to 10 characters,
    as containerd does: the message must not carry the oversized input back)."""
    for key, value in labels.items():
        if label_bytes(key, value) > LABEL_MAX_BYTES:
            raise InvalidArgument(
                f"{what}: label key and value greater than maximum size ({LABEL_MAX_BYTES} bytes), "
                f"key: {key[:10]}"
            )
    size = labels_wire_bytes(labels)
    if size > LABELS_MAX_BYTES:
        raise InvalidArgument(
            f"{what}: labels take {size} bytes, more than the {LABELS_MAX_BYTES} allowed per object"
        )


def kept_labels(labels: Mapping[str, str]) -> tuple[dict[str, str], int]:
    """The labels of a stored record that are within the bounds, and how many were left out.

    For records an older version stored without bounds: a label over LABEL_MAX_BYTES is left out,
    then labels are kept in key order while they fit LABELS_MAX_BYTES."""
    kept: dict[str, str] = {}
    size = 0
    for key in sorted(labels):
        value = labels[key]
        if label_bytes(key, value) > LABEL_MAX_BYTES:
            continue
        one = labels_wire_bytes({key: value})
        if size + one > LABELS_MAX_BYTES:
            continue
        kept[key] = value
        size += one
    return kept, len(labels) - len(kept)


def check_ref(ref: str, what: str = "ingest ref") -> None:
    """InvalidArgument for an empty ref or one longer than containerd could send (REF_MAX_BYTES)."""
    if not ref:
        raise InvalidArgument(f"{what} must not be empty")
    size = len(ref.encode("utf-8", "surrogatepass"))
    if size > REF_MAX_BYTES:
        raise InvalidArgument(f"{what} is {size} bytes; at most {REF_MAX_BYTES} are allowed")


def ref_within_bounds(ref: str) -> bool:
    """Whether a stored ref could have come from containerd (see `check_ref`)."""
    return len(ref.encode("utf-8", "surrogatepass")) <= REF_MAX_BYTES


def short(text: str, limit: int = ERROR_MESSAGE_MAX) -> str:
    """`text` cut to `limit` characters, marked when it was cut (for messages quoting input)."""
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} characters)"


# -- the HTTP servers and clients of the network side (peer/) --------------------------------------

# POST /have: the digests one request may name, and the body that carries them (a digest in JSON is
# 73 bytes with its separator: 1024 of them take 75 KiB).
HAVE_MAX_DIGESTS = 1024
HAVE_MAX_BODY = 128 * KIB
# A /have answer stops adding views past this many bytes and says it was cut ("truncated": true);
# the asker treats the views left out as not held, as it treats an unanswered peer.
HAVE_MAX_RESPONSE = 4 * MIB
# Views computed between two yields to the event loop while answering /have.
HAVE_VIEWS_PER_YIELD = 32
# What a client accepts as a /have answer: the server's bound, with room for the one view that is
# always sent even when it alone is larger (a blob of very many chunks).
PEER_HAVE_MAX_RESPONSE = 2 * HAVE_MAX_RESPONSE
# Any other JSON answer of a peer (a blob's view).
PEER_JSON_MAX_RESPONSE = 1 * MIB
# Request bodies of the peer exchange port overall (aiohttp's client_max_size; the control plane's
# messages share the port). The mirror takes no bodies at all.
EXCHANGE_MAX_BODY = 1 * MIB
MIRROR_MAX_BODY = 16 * KIB
# Request line, each header field, and the number of header fields (aiohttp's parser limits).
MAX_REQUEST_LINE = 8190
MAX_HEADER_FIELD = 8190
MAX_HEADERS = 64
# A connection that has not sent a whole request head this many seconds after it opened or after
# its last answer is closed (aiohttp's keep-alive timer, which also runs before the first request).
IDLE_TIMEOUT = 15.0
# The client side keeps idle pooled connections for less than the servers do, so it never reuses
# one the server is closing.
CLIENT_KEEPALIVE = 10.0
# A request body must arrive within this many seconds of its head.
BODY_TIMEOUT = 10.0
# How long a server goes on reading (and dropping) a request body it did not want after answering,
# so the client sees the answer rather than a reset (aiohttp's lingering close; its default is 10 s).
LINGER_TIMEOUT = 2.0
# Requests one client address may have in progress at once; more are answered 429 at once. An
# honest node opens at most 32 connections to a peer (peer.node's connector), and a few nodes may
# share an address (a test site on loopback).
MAX_REQUESTS_PER_CLIENT = 128
