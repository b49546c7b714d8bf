"""`peer.control.client`: how long a control message may take before it counts as failed."""

from __future__ import annotations

import ssl

from peer.control.client import HANDSHAKE_TIMEOUT, ControlClient, Counters


def test_a_plain_message_fails_at_its_answer_timeout() -> None:
    assert ControlClient("default", Counters(), 1.0).patience(2.5) == 2.5


def test_over_tls_a_new_connections_handshake_is_bounded_apart() -> None:
    """`_timeout` gives the handshake `HANDSHAKE_TIMEOUT` beside the answer's: a sync may be on its
    way that much longer, and the index section must not give up on it before (`patience`)."""
    client = ControlClient("default", Counters(), 1.0, ssl=ssl.create_default_context())
    assert client.patience(2.5) == 2.5 + HANDSHAKE_TIMEOUT
