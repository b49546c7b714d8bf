"""Which local client may read what through the registry mirror (issue 10, item 2).

The mirror holds, and can fetch with the node's own credentials, content of repositories that
need credentials. Any local process can reach it, so it never hands out content on the node's
word: a request for a manifest or blob of `registry/repo` is answered only once the asking
client's own credentials (HTTP basic, as containerd sends them after a `401` with a Basic
challenge; none: anonymous) are shown good for that very object at the origin: a HEAD of it,
asked with those credentials and nothing of the node's (`OriginClient.can_pull`).

That check covers both leaks of finding 3: content of a private repository to a client without
its credentials, and a stored private blob asked for under another repository name (the HEAD is
of the blob in the repository named, where the registry does not have it). Public content passes
with anonymous credentials, and an anonymous grant is good for every client.

Answers are cached per (registry, repository, object, credentials) for `ttl` seconds, then asked
again (revoked credentials stop working within `ttl`); at most `max_entries` are kept. Concurrent
requests for the same check share one HEAD. When the origin cannot be asked, the request is
refused (fail closed) unless a grant is still cached.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass

from peer.origin import BasicCredentials, OriginClient

DEFAULT_TTL = 30.0
DEFAULT_MAX_ENTRIES = 4096


@dataclass(frozen=True)
class Object:
    """What a client asked the mirror for: `kind` is "manifests" or "blobs"."""

    registry: str
    repository: str
    kind: str
    reference: str


def basic_credentials(authorization: str | None) -> BasicCredentials | None:
    """The credentials of an `Authorization: Basic ...` header; None for anything else (a client
    that sends no usable basic credentials is anonymous)."""
    scheme, _, value = (authorization or "").partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        user, sep, password = base64.b64decode(value.strip(), validate=True).decode().partition(":")
    except (binascii.Error, UnicodeDecodeError):
        return None
    return BasicCredentials(user, password) if sep else None


class ClientAccess:
    """The mirror's gate: `allows(obj, authorization)` (see the module docstring)."""

    def __init__(
        self,
        origin: OriginClient,
        ttl: float = DEFAULT_TTL,
        *,
        max_entries: int = DEFAULT_MAX_ENTRIES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._origin = origin
        self._ttl = ttl
        self._max_entries = max_entries
        self._clock = clock
        self._answers: dict[tuple[Object, str], tuple[float, bool]] = {}
        self._inflight: dict[tuple[Object, str], asyncio.Future[bool]] = {}
        self.checks = 0  # HEADs sent to the origin (metrics, tests)

    def __len__(self) -> int:
        """How many answers are cached (at most `max_entries`)."""
        return len(self._answers)

    async def allows(self, obj: Object, authorization: str | None) -> bool:
        """True if the client sending `authorization` may read `obj`; raises what the origin's
        failure maps to (Unavailable, ...) when it cannot be asked and nothing is cached."""
        creds = basic_credentials(authorization)
        if self._cached(obj, "") is True:
            return True  # anyone may: the object is public
        if creds is None:
            return await self._check(obj, "", None)
        who = hashlib.sha256(f"{creds.username}\0{creds.password}".encode()).hexdigest()
        return await self._check(obj, who, creds)

    def _cached(self, obj: Object, who: str) -> bool | None:
        hit = self._answers.get((obj, who))
        if hit is None or self._clock() >= hit[0]:
            return None
        return hit[1]

    async def _check(self, obj: Object, who: str, creds: BasicCredentials | None) -> bool:
        """The cached answer, or one HEAD at the origin shared by every concurrent asker."""
        cached = self._cached(obj, who)
        if cached is not None:
            return cached
        key = (obj, who)
        pending = self._inflight.get(key)
        if pending is not None:
            return await asyncio.shield(pending)
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._inflight[key] = future
        try:
            self.checks += 1
            ok = await self._origin.can_pull(obj.registry, obj.repository, obj.kind, obj.reference, creds)
            self._remember(key, ok)
            future.set_result(ok)
            return ok
        except asyncio.CancelledError:
            future.cancel()
            raise
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: a failed check nobody else awaited is not an error to log
            raise
        finally:
            del self._inflight[key]

    def _remember(self, key: tuple[Object, str], ok: bool) -> None:
        now = self._clock()
        if len(self._answers) >= self._max_entries:
            self._answers = {k: v for k, v in self._answers.items() if v[0] > now}
            while len(self._answers) >= self._max_entries:
                del self._answers[next(iter(self._answers))]  # the oldest entry
        self._answers[key] = (now + self._ttl, ok)


__all__ = ["ClientAccess", "DEFAULT_TTL", "Object", "basic_credentials"]
